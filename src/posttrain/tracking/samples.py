"""samples.jsonl: a few of each RL step's completions as the engine produced them, to read what the policy does.

Each row: step, prompt and completion text decoded with their special tokens (so a missing BOS or an invented
next turn is visible), the completion's token ids, reward, correct, the verifier's info (e.g. what answer it read,
or a user reward's own fields), finish reason and the policy version that sampled it. On resume, rows after the
checkpoint's step are dropped, as metrics.jsonl is cut back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SAMPLES = "samples.jsonl"


class SampleLog:
    def __init__(self, run_dir: Path, *, resume_step: int | None = None):
        self.path = run_dir / SAMPLES
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines()
                    if _step(line) is not None and _step(line) <= resume_step]  # a cut last line goes too
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._f = self.path.open("a", encoding="utf-8")

    def log(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")  # info may hold any value
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _step(line: str) -> int | None:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row.get("step") if isinstance(row, dict) and isinstance(row.get("step"), int) else None
