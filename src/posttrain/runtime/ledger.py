"""The run's running totals (the compute ledger's FLOPs by kind, tokens, wasted work), and what one part of a step
measured. Step helpers return a `Measured` instead of writing into the run; the stage loop accounts for it once
(runtime/loop.py `StageLoop.account`). tracking/ledger.py's FlopModel says how much work a pass is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Measured:
    """What a part of a step measured: entries of the step's metric row, work by kind (FLOPs: generate, ref, old,
    teacher, mismatch, train), cumulative counters that are not work (tokens, wasted FLOPs) and notes for run.log."""

    metrics: dict[str, Any] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Ledger:
    """Cumulative counters, written into every metric row and every checkpoint."""

    def __init__(self, totals: dict[str, float] | None = None) -> None:
        self.totals: dict[str, float] = dict(totals or {})

    def add_flops(self, stage: str, **by_kind: float) -> None:
        """Count work: add_flops(stage, generate=..., train=...) adds to compute/<kind>_flops, to compute/flops
        (all work) and to compute/<stage>_flops (the x-axis of one stage's own scaling curve)."""
        for kind, flops in by_kind.items():
            self.add(**{f"compute/{kind}_flops": flops, "compute/flops": flops, f"compute/{stage}_flops": flops})

    def add(self, **counters: float) -> None:
        """Add to cumulative counters that are not a kind of work (tokens, wasted FLOPs)."""
        for k, v in counters.items():
            self.totals[k] = self.totals.get(k, 0.0) + v
