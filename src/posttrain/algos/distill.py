"""Distillation signals on the student's own samples (ALGORITHMS.md §12): pure functions.

On-policy distillation (OPD; Thinking Machines, "On-Policy Distillation", 2025; Qwen3, arXiv 2505.09388 §4.5): the
student samples, a frozen teacher scores the same tokens, and the per-token reverse KL
rkl_t = log π_student(x_t) - log π_teacher(x_t) is the signal. As an advantage, -rkl_t goes into any policy-gradient
loss (`reverse_kl` below, an ADVANTAGES entry), alone or added to a verifier's advantage.

KDRL (Xu et al., arXiv 2506.02208): GRPO plus β · KL(π_θ || π_T) as a loss term, the KL estimated per token by an
algos/kl.py estimator on the student's samples, β annealed (`annealed_coef`), the term optionally kept only on
samples the verifier failed (`distill_row_mask`). Which estimator sits in the loss decides the gradient:
  k2 = ½ (log π_θ - log π_T)²  its gradient (log π_θ - log π_T) ∇log π_θ is, in expectation over x ~ π_θ, the exact
                               gradient of the reverse KL KL(π_θ || π_T) (per position);
  k3 = r - 1 - log r           its gradient (1 - π_T/π_θ) ∇log π_θ has expectation -Σ π_T ∇log π_θ: the gradient of
                               the FORWARD KL KL(π_T || π_θ), though its value estimates the reverse one;
  k1                           its gradient ∇log π_θ has expectation 0: no signal (tests/algos/test_distill.py).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from posttrain.algos.advantages import ADVANTAGES
from posttrain.algos.inputs import AdvantageInputs


def discounted_to_go(values: Tensor, mask: Tensor, discount: float) -> Tensor:
    """(B, T) -> Σ_{i >= t} discount^(i - t) values_i over valid tokens (padding contributes 0). discount = 0 is
    the values themselves, discount = 1 the plain reward-to-go."""
    v = values * mask
    if discount == 0:
        return v
    out = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        running = v[:, t] + discount * running
        out[:, t] = running
    return out * mask


@ADVANTAGES.register("reverse_kl", needs_teacher=True)
def reverse_kl(
    x: AdvantageInputs, *,
    coef: Annotated[float, Field(gt=0, description="weight of the distillation signal (Tinker kl_penalty_coef)")] = 1.0,
    discount: Annotated[float, Field(ge=0, le=1, description="0: each token is credited with its own reverse KL "
                                     "(Tinker's default); 1: with the KL of the rest of the sample, the unbiased "
                                     "estimator of the sequence-level KL gradient")] = 0.0,
    reward_advantage: Annotated[str | None, Field(description="an ADVANTAGES entry whose verifier advantage is added "
                                                  "(e.g. 'grpo'); null: pure distillation, rewards unused")] = None,
    reward_coef: Annotated[float, Field(ge=0, description="weight of reward_advantage's term")] = 1.0,
) -> Tensor:
    """On-policy distillation: A_t = coef · Σ_{i>=t} discount^(i-t) (log π_T(x_i) - log π_sample(x_i))
    [+ reward_coef · reward_advantage(x)], on the sampled tokens (Tinker cookbook distillation/train_on_policy.py).

    Needs the teacher's logprobs (AdvantageInputs.teacher_logprobs) and the sampler's (logprobs). The signal is
    detached: a policy loss over it (reinforce, ppo_clip) makes its expected gradient -∇KL(π_θ || π_T).
    """
    if x.teacher_logprobs is None or x.logprobs is None:
        raise ValueError("reverse_kl needs teacher_logprobs and logprobs in AdvantageInputs (a [teacher] section)")
    signal = (x.teacher_logprobs - x.logprobs).detach()
    advantages = coef * discounted_to_go(signal, x.mask, discount)
    if reward_advantage is not None:
        if reward_advantage == "reverse_kl":
            raise ValueError("reverse_kl: reward_advantage cannot be reverse_kl itself")
        advantages = advantages + reward_coef * ADVANTAGES.get(reward_advantage)(x)
    return advantages


def annealed_coef(start: float, end: float | None, step: int, steps: int,
                  schedule: Literal["constant", "linear", "cosine"] = "linear") -> float:
    """β at `step` (0-based) of an anneal over `steps` steps from `start` to `end` (KDRL anneals 5e-3 -> 1e-3);
    end None or steps 0 is a constant start. After `steps` the value stays at `end`."""
    if end is None or steps <= 0 or schedule == "constant":
        return start
    frac = min(max(step / steps, 0.0), 1.0)
    if schedule == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return start + (end - start) * frac


def distill_row_mask(correct: Tensor, mode: Literal["all", "failed"]) -> Tensor:
    """(B,) bool correct -> (B,) float: which samples carry the distillation term. 'failed': KDRL's reward-guided
    masking, only samples the verifier did not accept (a correct answer needs no teacher pull)."""
    if mode == "all":
        return torch.ones(correct.shape, dtype=torch.float)
    if mode == "failed":
        return (~correct.bool()).float()
    raise ValueError(f"distill mask must be 'all' or 'failed', got {mode!r}")
