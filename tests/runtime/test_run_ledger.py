"""The run's ledger and the step's measurements (runtime/ledger.py), and the loop accounting for them once
(runtime/loop.py StageLoop.account): hand-computed totals."""

from __future__ import annotations

from types import SimpleNamespace

from posttrain.runtime.ledger import Ledger, Measured
from posttrain.runtime.loop import StageLoop


def test_work_counts_under_its_kind_the_total_and_the_stage():
    ledger = Ledger({"compute/flops": 1.0})
    ledger.add_flops("rl", generate=10.0, ref=2.5)
    ledger.add_flops("sft", train=4.0)
    ledger.add(**{"rollout/tokens": 7.0})
    ledger.add(**{"rollout/tokens": 3.0})
    assert ledger.totals == {"compute/flops": 17.5, "compute/generate_flops": 10.0, "compute/rl_flops": 12.5,
                             "compute/ref_flops": 2.5, "compute/train_flops": 4.0, "compute/sft_flops": 4.0,
                             "rollout/tokens": 10.0}


def test_a_ledger_starts_from_a_checkpoints_totals_without_sharing_them():
    saved = {"compute/flops": 5.0}
    ledger = Ledger(saved)
    ledger.add_flops("rl", train=1.0)
    assert saved == {"compute/flops": 5.0} and ledger.totals["compute/flops"] == 6.0


class _Say:
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_the_loop_accounts_for_a_measurement_once_and_hands_back_its_metrics():
    say, ledger = _Say(), Ledger()
    loop = object.__new__(StageLoop)  # only what account() reads: the stage's name and the run's context
    loop.name, loop.ctx = "dpo", SimpleNamespace(services=say, ledger=ledger)
    metrics = loop.account(Measured({"dpo/loss": 0.5}, flops={"generate": 3.0, "ref": 1.0},
                                    counters={"compute/wasted_flops": 2.0}, notes=["a group was dropped"]))
    assert metrics == {"dpo/loss": 0.5}
    assert say.notes == ["a group was dropped"]
    assert ledger.totals == {"compute/generate_flops": 3.0, "compute/flops": 4.0, "compute/dpo_flops": 4.0,
                             "compute/ref_flops": 1.0, "compute/wasted_flops": 2.0}
    assert loop.account(Measured()) == {} and ledger.totals["compute/flops"] == 4.0
