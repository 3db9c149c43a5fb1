"""Weights & Biases as an optional metrics sink ([tracking] wandb = true; pip install wandb).

metrics.jsonl stays the record; W&B gets the same rows. The W&B run id is kept in the run directory (wandb-id),
so a resumed run continues the same W&B run (resume="allow"). On a resume the kept rows of metrics.jsonl (up to
the checkpoint) that W&B does not already have are sent again first: a process killed before W&B flushed loses
nothing there, and an offline run's latest directory holds the whole run. W&B refuses steps below the last it
has, so rows it already has are skipped.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from posttrain.errors import MissingExtraError
from posttrain.tracking.metrics import read_metrics

ID_FILE = "wandb-id"


class WandbSink:
    def __init__(self, run_dir: Path, *, project: str, entity: str | None, name: str, mode: str, tags: list[str],
                 config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise MissingExtraError("[tracking] wandb = true needs Weights & Biases: pip install wandb") from None
        id_file = run_dir / ID_FILE
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(8))
        self._last_step = -1
        self.run = wandb.init(project=project, entity=entity, name=name, id=id_file.read_text().strip(),
                              resume="allow", mode=mode, dir=str(run_dir), config=config, tags=tags or None,
                              settings=wandb.Settings(console="off", silent=True))
        has_up_to = int(getattr(self.run, "step", 0) or 0) - 1  # the last step W&B already holds (online resume)
        self._last_step = has_up_to
        for row in read_metrics(run_dir):  # already cut back to the checkpoint being resumed
            if int(row["step"]) > has_up_to:
                self.log(row)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        if step < self._last_step:  # W&B drops an older step with a warning per row; skip it quietly instead
            return
        self._last_step = step
        self.run.log({k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)
                      and not isinstance(v, bool)}, step=step)

    def close(self) -> None:
        self.run.finish()
