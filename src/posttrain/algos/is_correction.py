"""Sampler-vs-trainer importance correction: ``fn(trainer_logprobs, sampler_logprobs, mask, *, cap) -> (B,T)``.

Even with identical weights the rollout engine (vLLM, bf16 kernels) and the trainer assign different
probabilities, so "on-policy" RL is off-policy (Yao et al., "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training", fengyao.notion.site/off-policy-rl; ALGORITHMS.md §4c). The weight
w = π_trainer(θ_old) / π_sampler(θ_old) multiplies the policy loss (``is_weights`` of policy_losses.py).
Returned weights are detached; at mask = 0 they are 1 (neutral: the loss there is already 0).
Weights are computed in log space so a long sequence's product cannot overflow.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from posttrain.algos.kl import k3
from posttrain.registry import Registry


class ISCorrectionFn(Protocol):
    def __call__(
        self, trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *, cap: float = 2.0
    ) -> Tensor: ...


IS_CORRECTIONS: Registry[ISCorrectionFn] = Registry("IS correction")


def _token_log_w(trainer_logprobs: Tensor, sampler_logprobs: Tensor, valid: Tensor) -> Tensor:
    lw = trainer_logprobs.detach() - sampler_logprobs.detach()
    return torch.where(valid, lw, torch.zeros_like(lw))  # (B, T), 0 = weight 1 at padding


def _seq_log_w(trainer_logprobs: Tensor, sampler_logprobs: Tensor, valid: Tensor) -> Tensor:
    # The product of token ratios (not the geometric mean ms-swift uses): the unbiased sequence weight, per the
    # "When Speed Kills Stability" blog (ALGORITHMS.md §4c).
    lw = _token_log_w(trainer_logprobs, sampler_logprobs, valid).sum(-1, keepdim=True)  # (B, 1)
    return lw.expand_as(trainer_logprobs)


def _check_cap(cap: float) -> float:
    if not cap >= 1.0:
        raise ValueError(f"IS cap must be >= 1, got {cap}")
    return math.log(cap)


@IS_CORRECTIONS.register("none")
def none(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *, cap: float = 2.0) -> Tensor:
    """No correction: all ones."""
    return torch.ones_like(trainer_logprobs).detach()


@IS_CORRECTIONS.register("tis")
def tis(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *, cap: float = 2.0) -> Tensor:
    """Token-level truncated IS (Yao et al.): min(w, cap). C = 2 is TRL's and ms-swift's default."""
    lw = _token_log_w(trainer_logprobs, sampler_logprobs, mask.bool())
    return lw.clamp(max=_check_cap(cap)).exp()


@IS_CORRECTIONS.register("mask")
def mask_(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *, cap: float = 2.0) -> Tensor:
    """Token-level masked IS (MIS / IcePop style): w if w <= cap else 0.

    One-sided on purpose, as ALGORITHMS.md §4c and TRL's token mask: the variance blow-up comes from large w,
    and a token with w < 1/cap is already down-weighted by w itself; zeroing it too would drop tokens the
    trainer finds unlikely, which are exactly the ones the update should push on.
    """
    lw = _token_log_w(trainer_logprobs, sampler_logprobs, mask.bool())
    return torch.where(lw <= _check_cap(cap), lw.exp(), torch.zeros_like(lw))


@IS_CORRECTIONS.register("seq_tis")
def seq_tis(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *, cap: float = 2.0) -> Tensor:
    """Sequence-level truncated IS: min(Π_t w_t, cap) on every token of the sequence."""
    valid = mask.bool()
    w = _seq_log_w(trainer_logprobs, sampler_logprobs, valid).clamp(max=_check_cap(cap)).exp()
    return torch.where(valid, w, torch.ones_like(w))


@IS_CORRECTIONS.register("seq_mask")
def seq_mask(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *, cap: float = 2.0) -> Tensor:
    """Sequence-level masked IS: Π_t w_t if it is <= cap, else the whole sequence gets weight 0."""
    valid = mask.bool()
    lw = _seq_log_w(trainer_logprobs, sampler_logprobs, valid)
    w = torch.where(lw <= _check_cap(cap), lw.exp(), torch.zeros_like(lw))
    return torch.where(valid, w, torch.ones_like(w))


def effective_sample_size(weights: Tensor, mask: Tensor) -> Tensor:
    """Normalised Kish ESS (Σw)² / (n Σw²) over valid tokens, in (0, 1] (VCPO, arXiv 2602.17616; ALGORITHMS.md
    §13a). 1 means uniform weights (on-policy); 1/n means one token carries all the weight.
    Returns 0 when no valid token has a nonzero weight (nothing effective is left).
    """
    w = torch.where(mask.bool(), weights.detach(), torch.zeros_like(weights)).double()
    n = mask.bool().sum()
    sq = (w**2).sum()
    if n == 0 or sq == 0:
        return torch.zeros((), dtype=weights.dtype)
    return (w.sum() ** 2 / (n * sq)).to(weights.dtype)


def mismatch_kl(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Mean k3 over valid tokens: a diagnostic of KL(π_sampler || π_trainer) (tokens were drawn by the sampler,
    so the sampler plays π_θ's role in kl.k3). 0 when there is no valid token."""
    valid = mask.bool()
    per_token = k3(sampler_logprobs.detach(), trainer_logprobs.detach())
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    return per_token.sum() / valid.sum().clamp(min=1)


def mismatch_metrics(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """The engine-vs-learner diagnostics logged every step the learner recomputes old logprobs: mean and max of
    |sampler - learner| logprob over valid tokens, and k3 KL(sampler || learner) (mismatch_kl)."""
    valid = mask.bool()
    if not valid.any():
        return {"is/mismatch_kl": 0.0, "is/logprob_diff_mean": 0.0, "is/logprob_diff_max": 0.0}
    diff = (sampler_logprobs.detach() - trainer_logprobs.detach()).abs()[valid]
    return {"is/mismatch_kl": float(mismatch_kl(trainer_logprobs, sampler_logprobs, mask)),
            "is/logprob_diff_mean": float(diff.mean()), "is/logprob_diff_max": float(diff.max())}
