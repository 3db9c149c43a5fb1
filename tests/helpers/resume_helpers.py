"""What the exact-resume tests share: undo a finished run back to a checkpoint, as if it had crashed there."""

import json
import shutil
from pathlib import Path

from posttrain.train.checkpoint import list_checkpoints


def crash_after(run_dir: Path, step: int) -> None:
    """Later checkpoints, the final model and the finish marker never happened (metrics.jsonl keeps the rows past
    the checkpoint, which a resume must not duplicate)."""
    for s, path in list_checkpoints(run_dir / "checkpoints"):
        if s > step:
            shutil.rmtree(path)
    for name in ("DONE", "summary.json"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "final")


def metric_rows_without_time(run_dir: Path) -> list[dict]:
    """metrics.jsonl without what depends on the wall clock (time/*, and the rates perf/*)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "perf/"))} for x in lines]
