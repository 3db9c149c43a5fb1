"""The run directory's bookkeeping: which directory is a run, whether it may be reused or deleted, provenance.

A run directory is created with a marker file (.posttrain-run); `--fresh` deletes a directory only if it carries
the marker (or is a run directory written before markers existed: a config.json holding posttrain's own
"config" and "meta"). A directory whose run has taken no resumable step (no complete checkpoint, not finished)
belongs to whoever runs next: a corrected command after a failed start replaces it instead of being refused.
config.json keeps the config and the provenance of the run's creation; every later start (a resume) is appended
to its "starts" list, so a run made by old code is never relabelled with the current code version.

A run directory has one writer at a time: `owned(run_dir)` holds an advisory lock (flock) on a file beside it,
`.NAME.lock`, which says who owns it (pid, host, command, since when). A second writer gets one line naming the
owner. The kernel drops the lock when its owner dies, however it dies, so a SIGKILLed owner's lock is simply taken
over; beside (not inside) the directory so that `--fresh` deleting the directory cannot drop it.

Light on purpose (no torch, no transformers): the CLI reads a finished run's summary through it in a blink.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

MARKER = ".posttrain-run"
DONE = "DONE"
CONFIG = "config.json"


def is_run_dir(path: Path) -> bool:
    if (path / MARKER).is_file():
        return True
    try:  # written before markers existed
        saved = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and isinstance(saved.get("config"), dict) and isinstance(saved.get("meta"), dict)


def remove_run_dir(path: Path) -> None:
    """Delete a run directory, and nothing that is not one."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir() or not is_run_dir(path):
        raise UserError(f"--fresh: {path} is not a posttrain run directory (no {MARKER} marker); refusing to delete "
                        "it. Pick another run name or output_dir")
    shutil.rmtree(path)


def has_resumable_step(path: Path) -> bool:
    """A finished run, or one with at least one complete checkpoint."""
    if (path / DONE).exists():
        return True
    ckpts = path / "checkpoints"
    return ckpts.is_dir() and any((p / "COMPLETE").is_file() for p in ckpts.glob("step_*"))


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between configs a (saved) and b. A key a lacks (one a newer posttrain
    added) counts only when b sets it to something: absent and empty ([], {}, None) mean the same feature unused."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if k not in a and vb in (None, [], {}):
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


def read_saved(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {e}); it is not a posttrain run's config — move "
                        "it away, or start over with --fresh") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise UserError(f"{path}: not a posttrain run's config (no 'config' object); start over with --fresh")
    return saved


# Keys that say where the work runs, not what it computes: a run may resume with other values (a learner saved by
# N ranks resumes in M). Each start records the values it ran with.
LAYOUT_KEYS = ("learner.",)


def check_same_config(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    saved = read_saved(run_dir)
    changed = [k for k in diff_keys(saved["config"], config) if not k.startswith(LAYOUT_KEYS)]
    if changed:
        raise UserError(f"{run_dir} holds a run with a different config ({', '.join(changed[:5])} differ); use "
                        "--fresh to start over, or another name")
    return saved


def code_version() -> dict[str, Any]:
    """The git revision of the installed posttrain source and whether its tree has uncommitted changes."""
    here = Path(__file__).parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             check=False, cwd=here).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True,
                                    timeout=5, check=False, cwd=here).stdout.strip()) if rev else None
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "", None
    return {"code": rev or "unknown", "dirty": dirty}


# The CPU features that change which kernels torch runs (and so the numbers): bf16 units decide `bf16 = "auto"`.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni")


def cpu_kind() -> dict[str, Any]:
    """The CPU's model name and its numerics-relevant features, from /proc/cpuinfo ({} where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {"cpu": platform.processor() or platform.machine()}
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[:40]) if k.strip()}
    flags = set(field.get("flags", "").split())
    return {"cpu": field.get("model name", platform.machine()), "cpu_features": [f for f in CPU_FEATURES if f in flags]}


def provenance() -> dict[str, Any]:
    import posttrain

    versions: dict[str, Any] = {"posttrain": posttrain.__version__, **code_version(),
                                "python": platform.python_version(), "host_cpus": os.cpu_count(), **cpu_kind()}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def finished_summary(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """A finished run's summary (after checking it is the same config), or None if the run is not finished."""
    if not (run_dir / DONE).exists():
        return None
    check_same_config(run_dir, config)
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{run_dir / 'summary.json'}: unreadable ({e}); start over with --fresh") from None


def _write_saved(run_dir: Path, saved: dict[str, Any]) -> None:
    """config.json, replaced whole (a crash leaves the old one)."""
    tmp = run_dir / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(saved, indent=1))
    tmp.replace(run_dir / CONFIG)


def record_precision(run_dir: Path, requested: bool | str, bf16: bool, why: str) -> None:
    """Record on the latest start in config.json which precision `model.bf16` resolved to and why."""
    saved = read_saved(run_dir)
    saved["starts"][-1]["precision"] = {"requested": requested, "resolved": "bf16" if bf16 else "fp32", "why": why,
                                        **cpu_kind()}
    _write_saved(run_dir, saved)


def record_tokenizer(run_dir: Path, summary: dict[str, Any]) -> None:
    """Record on the latest start in config.json what the tokenizer does (data/prompts.py tokenizer_summary)."""
    saved = read_saved(run_dir)
    saved["starts"][-1]["tokenizer"] = summary
    _write_saved(run_dir, saved)


def record_stage(run_dir: Path, stage: str, *, resumed: bool) -> None:
    """Append to config.json which code ran a stage (a stage resumed after an upgrade shows the new version)."""
    saved = read_saved(run_dir)
    saved.setdefault("stages", []).append({"stage": stage, "resumed": resumed, "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                           **code_version()})
    _write_saved(run_dir, saved)


def prepare(run_dir: Path, config: dict[str, Any], toml_text: str, *, fresh: bool) -> tuple[Path, str | None]:
    """Create (or reuse) the run directory. -> (run_dir, a note for the log or None)."""
    note = None
    if fresh:
        remove_run_dir(run_dir)
    elif is_run_dir(run_dir) and not has_resumable_step(run_dir):
        # Nothing to resume (a failed start, or a crash before the first checkpoint): the directory belongs to this
        # command, whatever config it held, so a corrected command is never refused.
        remove_run_dir(run_dir)
        note = f"{run_dir} held a run that never reached a checkpoint; started it over"
    elif run_dir.exists() and any(run_dir.iterdir()) and not is_run_dir(run_dir):
        raise UserError(f"{run_dir} exists and is not a posttrain run directory; pick another name or output_dir")
    start = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), **code_version(),
             **{k.rstrip("."): config.get(k.rstrip(".")) for k in LAYOUT_KEYS}}
    if (run_dir / CONFIG).exists():
        saved = check_same_config(run_dir, config)
        saved.setdefault("starts", []).append(start)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / MARKER).write_text("a posttrain run directory; `posttrain run --fresh` may delete it\n")
        meta = provenance()
        (run_dir / "config.toml").write_text(f"# resolved recipe; posttrain {meta['posttrain']} (code {meta['code']}"
                                             f"{', uncommitted changes' if meta['dirty'] else ''})\n" + toml_text)
        saved = {"config": config, "meta": meta, "starts": [start]}
    (run_dir / MARKER).touch()
    _write_saved(run_dir, saved)
    return run_dir, note


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


@contextlib.contextmanager
def owned(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the block; UserError naming the owner if a live process holds it."""
    path = lock_path(run_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"{path}: cannot create the run directory's lock ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir} is in use by {_owner(fd)}; wait for it to finish or stop it "
                            f"(the lock is {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "command": " ".join(sys.argv)[:300]}).encode() + b"\n", 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a writer that just opened it)


def _owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file says no more)"
