"""Numerical guards: a non-finite loss or gradient skips the update; K in a row stop the run, naming the step and
the first offending tensor."""

from __future__ import annotations

import math

from torch import nn

from posttrain.errors import UserError
from posttrain.train.sharding import is_sharded


def first_nonfinite_grad(model: nn.Module) -> str | None:
    for name, p in model.named_parameters():
        grad = p.grad.to_local() if p.grad is not None and is_sharded(p.grad) else p.grad  # sharded: this rank's part
        if grad is not None and not bool(grad.isfinite().all()):
            return name
    return None


class UpdateGuard:
    def __init__(self, max_bad_steps: int, bad_steps: int = 0):
        self.max_bad_steps = max_bad_steps
        self.bad_steps = bad_steps

    def check(self, model: nn.Module, *, loss: float, grad_norm: float, where: str) -> str | None:
        """None if the update is safe; otherwise the reason (and the caller skips optimizer.step()).
        Raises once `max_bad_steps` consecutive updates were bad."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.bad_steps = 0
            return None
        self.bad_steps += 1
        culprit = first_nonfinite_grad(model)
        reason = (f"{where}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} (loss {loss}, grad norm "
                  f"{grad_norm}" + (f", first non-finite gradient: {culprit}" if culprit else "") + ")")
        if self.bad_steps >= self.max_bad_steps:
            raise UserError(f"{reason}; {self.bad_steps} consecutive bad updates, stopping "
                            "(lower the learning rate, or check the data/rewards)")
        return reason
