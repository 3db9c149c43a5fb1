"""What a stage may ask of its learner: the Learner (train/learner.py, one process) and the LearnerGroup
(train/learner_group.py, N sharded ranks) both satisfy it, so a stage runs on either unchanged.

    def update(learner: LearnerLike, ...) -> StepResult:
        return learner.train_step(seqs, loss_fn, rows=rows, temperature=c.temperature)

Structural (typing.Protocol): neither class inherits from it; tests/train/test_learner_protocol.py checks that every
member exists on both with a compatible signature. A member goes here only when a stage (recipes/, runtime/loop.py)
uses it; what only the runner or a benchmark asks of a group (peak_memory, close) stays off it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

    from posttrain.tracking.ledger import FlopModel
    from posttrain.train.learner import FrozenModel, LossFn, Sequences, StepResult


@runtime_checkable
class LearnerLike(Protocol):
    flop_model: FlopModel  # the policy's FLOP counts, for the compute ledger

    def train_step(self, seqs: Sequences, loss_fn: LossFn, *, rows: Tensor | None = None,
                   temperature: float = 1.0, with_entropy: bool = False, where: str = "update",
                   keep_together: Tensor | None = None, pack_tokens: int | None = None) -> StepResult:
        """One optimizer update over `rows` (default: all) of `seqs`."""
        ...

    def logprobs(self, seqs: Sequences, *, temperature: float = 1.0) -> tuple[list[Tensor], float]:
        """The current policy's logprobs of every row, and the FLOPs it took."""
        ...

    def weights(self) -> Mapping[str, Tensor]:
        """The policy's weights after the last update (for an engine's update_weights)."""
        ...

    def frozen_copy(self) -> FrozenModel:
        """A frozen snapshot of the current policy (a KL term's reference)."""
        ...

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moment estimates."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The trainer state a checkpoint holds."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from a state_dict() of a learner of any layout."""
        ...
