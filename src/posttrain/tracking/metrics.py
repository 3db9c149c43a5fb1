"""Metric sinks: metrics.jsonl (the record) and TensorBoard (for looking). Both append-only.

On resume the JSONL is cut back to the byte offset stored in the checkpoint, so a crash never leaves duplicated
or orphaned steps behind.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any


def memory_mb() -> dict[str, float]:
    """This process's memory for every metrics row: resident now and its peak so far (host RAM), and on a GPU the
    peak allocated by torch. Named perf/ like the other machine-dependent figures, which a comparison of two runs'
    numbers leaves out."""
    out = {"perf/peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            out["perf/rss_mb"] = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    torch = sys.modules.get("torch")  # not imported here: metrics stay light
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["perf/cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class MetricsLog:
    def __init__(self, run_dir: Path, *, tensorboard: bool = True, resume_step: int | None = None,
                 sinks: list[Any] | None = None):
        """resume_step: the global step of the checkpoint a resumed run continues from. metrics.jsonl was cut back
        to it; TensorBoard events logged after it (before the crash) are purged the same way. sinks: more
        receivers of every row (log(row), close()), e.g. tracking/wandb_sink.py."""
        self.path = run_dir / "metrics.jsonl"
        self._f = self.path.open("a")
        self._sinks = list(sinks or [])
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        for sink in self._sinks:
            sink.log(row)
        if self._tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self._tb.add_scalar(k, v, step)

    def offset(self) -> int:
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        for sink in self._sinks:
            sink.close()


def truncate_metrics(run_dir: Path, offset: int) -> None:
    path = run_dir / "metrics.jsonl"
    if path.exists() and path.stat().st_size > offset:
        with path.open("r+b") as f:
            f.truncate(offset)


def read_metrics(run_dir: Path, *, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """metrics.jsonl rows in file order ([] when the file does not exist); see `numbered_metrics`."""
    return [row for _, row in numbered_metrics(run_dir, notes=notes)]


def numbered_metrics(run_dir: Path, *, notes: list[str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of metrics.jsonl. The one policy for a bad line, used by every reader (report, fit,
    sweeps): the LAST line may have been cut by a crash mid-write, so it is skipped (and noted in `notes`, if
    given; the next resume truncates it away); any other line that is not a JSON object is corruption, an error
    naming file:line, and so is a file that is not UTF-8."""
    from posttrain.errors import UserError

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 (byte {e.start}): the file is damaged") from None
    rows = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            if i == last:
                if notes is not None:
                    notes.append(f"{path.name}: its last line is incomplete (a crash mid-write?) and was skipped")
                continue
            raise UserError(f"{path}:{i + 1}: not a JSON line ({getattr(e, 'msg', e)}): the file is damaged") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i + 1}: expected a JSON object, got {type(row).__name__}")
        rows.append((i + 1, row))
    return rows
