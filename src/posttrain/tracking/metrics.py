"""Metric sinks: metrics.jsonl (the record) and TensorBoard (for looking). Both append-only.

On resume the JSONL is cut back to the byte offset stored in the checkpoint, so a crash never leaves duplicated
or orphaned steps behind.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class MetricsLog:
    def __init__(self, run_dir: Path, *, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self._f = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
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


def truncate_metrics(run_dir: Path, offset: int) -> None:
    path = run_dir / "metrics.jsonl"
    if path.exists() and path.stat().st_size > offset:
        with path.open("r+b") as f:
            f.truncate(offset)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash; the next resume truncates it away
            continue
    return rows
