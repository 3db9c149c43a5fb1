"""The small mutable state of a run: where it is (global step, stage), how long it has taken, its evaluations'
headlines and a stop request. The stage loop and the runner move it; everything else reads it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RunState:
    global_step: int = 0  # optimizer steps of the whole run; also the version of the policy's weights
    stage: str = "base"  # the stage running now; its compute is also counted as compute/<stage>_flops
    stage_index: int = 0  # its position in the recipe (checkpoints record it)
    started: float = field(default_factory=time.time)
    elapsed_offset: float = 0.0  # seconds spent before a resume
    evals: dict[str, dict] = field(default_factory=dict)  # tag -> headline metrics
    stop_requested: str | None = None  # set by the runner's SIGTERM handler; stages stop at the next step end

    def elapsed(self) -> float:
        return self.elapsed_offset + time.time() - self.started
