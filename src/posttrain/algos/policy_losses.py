"""Per-token policy-gradient losses: ``fn(x: PolicyLossInputs, **hyperparameters) -> (loss (B,T), metrics)``.

Each entry declares its own hyperparameters as keyword-only arguments (set in a recipe as
``[rl.policy_loss_args]``), so a name means one thing: ``eps_high`` is PPO's upper clip bound in ppo_clip and
gspo, and CISPO's IS-weight cap is a separate ``max_weight``.

The loss is the NEGATIVE objective per token (minimise it), zero where mask = 0, and the aggregation
(aggregation.py) turns it into a scalar. Metrics are per-token (B,T), detached and zero where mask = 0, so they
aggregate the same way:
  ratio          the importance ratio the loss used (token ratio, or the GSPO sequence ratio)
  clip_frac      1 where the token's gradient was zeroed or its weight clipped
  clip_frac_low  ... because the ratio fell below the lower bound
  clip_frac_high ... because the ratio exceeded the upper bound (or the dual-clip bound)
``is_weights`` (detached, e.g. the truncated sampler-vs-trainer weights of is_correction.py) multiply the loss.

Log-ratios are clamped to [-20, 20] before exp (as verl does) so a stale token cannot overflow to inf.
"""

from __future__ import annotations

from typing import Annotated, Protocol

import torch
from pydantic import Field
from torch import Tensor

from posttrain.algos.inputs import PolicyLossInputs
from posttrain.registry import Registry

LOG_RATIO_CLAMP = 20.0

EpsLow = Annotated[float, Field(ge=0, description="lower clip bound: ratio >= 1 - eps_low")]
EpsHigh = Annotated[float, Field(ge=0, description="upper clip bound: ratio <= 1 + eps_high (DAPO clip-higher)")]
DualClip = Annotated[float | None, Field(gt=1, description="dual-clip constant c: caps the loss of A < 0 tokens "
                                          "at -A c (verl semantics); null = off")]


class PolicyLossFn(Protocol):
    def __call__(self, x: PolicyLossInputs, **hyperparameters: object) -> tuple[Tensor, dict[str, Tensor]]: ...


POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


def _log_ratio(logprobs: Tensor, old_logprobs: Tensor, valid: Tensor) -> Tensor:
    # where() before exp: padding may hold -inf logprobs, and inf * 0 would poison the gradient.
    lr = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    return lr.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _finish(
    loss: Tensor, valid: Tensor, is_weights: Tensor | None, ratio: Tensor, low: Tensor, high: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    if is_weights is not None:
        loss = loss * is_weights.detach()
    zero = torch.zeros_like(loss)
    loss = torch.where(valid, loss, zero)
    low, high = low & valid, high & valid
    metrics = {
        "ratio": torch.where(valid, ratio.detach(), zero.detach()),
        "clip_frac": (low | high).to(loss.dtype),
        "clip_frac_low": low.to(loss.dtype),
        "clip_frac_high": high.to(loss.dtype),
    }
    return loss, metrics


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate (Schulman et al., arXiv 1707.06347, eq. 7) with decoupled bounds (DAPO
    Clip-Higher, arXiv 2503.14476, §3.1) and an optional dual clip (Ye et al., arXiv 1912.09729).

    Returns (loss, clipped_low, clipped_high); a clipped token is one whose gradient the max/min zeroed.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    # Strict >: at A = 0 or inside the trust region both branches tie and the gradient flows.
    was_clipped = clipped > unclipped
    low = was_clipped & (ratio < 1.0)
    high = was_clipped & (ratio > 1.0)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        # For A < 0 a huge ratio makes -A * ratio unbounded; verl caps it at -A * c.
        cap = -advantages * dual_clip
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        high = high | dual
    return loss, low, high


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(x: PolicyLossInputs, *, eps_low: EpsLow = 0.2, eps_high: EpsHigh = 0.2,
             dual_clip: DualClip = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO/DAPO token loss: max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), r = exp(logp - logp_old).

    GRPO (arXiv 2402.03300, §4.1) uses eps_low = eps_high = 0.2; DAPO (arXiv 2503.14476) 0.2 / 0.28.
    ``dual_clip = c`` additionally caps the loss of A < 0 tokens at -A c (verl semantics).
    """
    valid = x.mask.bool()
    ratio = torch.exp(_log_ratio(x.logprobs, x.old_logprobs, valid))  # (B, T)
    loss, low, high = _clipped_surrogate(ratio, x.advantages, eps_low, eps_high, dual_clip)
    return _finish(loss, valid, x.is_weights, ratio, low, high)


@POLICY_LOSSES.register("gspo")
def gspo(x: PolicyLossInputs, *, eps_low: EpsLow = 0.2, eps_high: EpsHigh = 0.2,
         dual_clip: DualClip = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al., arXiv 2507.18071), in its GSPO-token form (same paper).

    s_i = exp(mean over valid t of (logp - logp_old)) is the length-normalised sequence ratio; every token gets
    s_i,t = sg(s_i) * exp(logp_t - sg(logp_t)), whose value is s_i and whose gradient w.r.t. logp_t is s_i.
    With "seq_mean_token_mean" aggregation the per-token 1/|o_i| then gives exactly the GSPO gradient
    s_i A_i (1/|o_i|) Σ_t ∇logp_t. Clipping acts on whole sequences; GSPO uses eps_low=3e-4, eps_high=4e-4.
    """
    valid = x.mask.bool()
    m = valid.to(x.logprobs.dtype)
    token_lr = torch.where(valid, x.logprobs - x.old_logprobs, torch.zeros_like(x.logprobs))  # (B, T)
    seq_lr = (token_lr.sum(-1) / m.sum(-1).clamp(min=1)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B,)
    lp = torch.where(valid, x.logprobs, torch.zeros_like(x.logprobs))
    ratio = torch.exp(seq_lr.detach()[:, None] + lp - lp.detach())  # (B, T), value s_i on every token
    loss, low, high = _clipped_surrogate(ratio, x.advantages, eps_low, eps_high, dual_clip)
    return _finish(loss, valid, x.is_weights, ratio, low, high)


@POLICY_LOSSES.register("cispo")
def cispo(
    x: PolicyLossInputs, *,
    max_weight: Annotated[float, Field(gt=0, description="upper cap of the IS weight sg(min(r, max_weight))")] = 5.0,
    min_weight: Annotated[float, Field(ge=0, description="lower cap of the IS weight (0 = off)")] = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): -sg(clip(r, min_weight, max_weight)) A logp.

    The IS weight is clipped and detached but every token keeps its REINFORCE gradient, unlike PPO which
    zeroes clipped tokens (often the rare "fork" tokens of reflective reasoning). The caps are absolute weights,
    not offsets from 1: MiniMax-M1's clip(r, 1 - eps_low, 1 + eps_high) with the lower bound off is
    min_weight = 0, max_weight = 1 + eps_high; ScaleRL's sg(min(r, eps_max)) with eps_max = 5 (arXiv
    2510.13786, §4) is max_weight = 5 (TRL's CISPO epsilon_high is the same absolute cap). Only the gradient is
    meaningful: the loss value is -w A logp, not a surrogate objective.
    """
    if min_weight > max_weight:
        raise ValueError(f"cispo: min_weight {min_weight} > max_weight {max_weight}")
    valid = x.mask.bool()
    ratio = torch.exp(_log_ratio(x.logprobs, x.old_logprobs, valid)).detach()  # (B, T)
    weight = ratio.clamp(min_weight, max_weight)
    lp = torch.where(valid, x.logprobs, torch.zeros_like(x.logprobs))
    loss = -weight * x.advantages * lp
    return _finish(loss, valid, x.is_weights, ratio, ratio < min_weight, ratio > max_weight)


@POLICY_LOSSES.register("reinforce")
def reinforce(x: PolicyLossInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """Vanilla policy gradient (Williams 1992, REINFORCE): -A logp. No ratio enters the loss (correct only
    on-policy); the ratio is still reported so off-policyness stays visible. Never clips. No hyperparameters."""
    valid = x.mask.bool()
    ratio = torch.exp(_log_ratio(x.logprobs, x.old_logprobs, valid)).detach()
    lp = torch.where(valid, x.logprobs, torch.zeros_like(x.logprobs))
    never = torch.zeros_like(valid)
    return _finish(-x.advantages * lp, valid, x.is_weights, ratio, never, never)


def _covariance(x: PolicyLossInputs, valid: Tensor) -> Tensor:
    """(B, T) per-token centred covariance (A - mean A)(logp - mean logp) over the valid tokens of the batch the
    loss sees (a micro-batch, as in verl), detached; -inf where not valid so no selection picks padding."""
    m = valid.to(x.logprobs.dtype)
    n = m.sum().clamp(min=1)
    lp = torch.where(valid, x.logprobs.detach(), torch.zeros_like(x.logprobs))
    adv = torch.where(valid, x.advantages, torch.zeros_like(x.advantages))
    cov = (adv - adv.sum() / n) * (lp - lp.sum() / n)
    return torch.where(valid, cov, torch.full_like(cov, -torch.inf))


CovFraction = Annotated[float, Field(gt=0, le=1, description="fraction of the valid tokens selected (at least one)")]


@POLICY_LOSSES.register("clip_cov")
def clip_cov(
    x: PolicyLossInputs, *, eps_low: EpsLow = 0.2, eps_high: EpsHigh = 0.2, clip_ratio: CovFraction = 2e-4,
    cov_low: Annotated[float, Field(description="a token is a candidate when cov_low < cov < cov_high")] = 1.0,
    cov_high: Annotated[float, Field(description="upper end of the candidates' covariance band")] = 5.0,
    seed: Annotated[int, Field(ge=0, description="of the draw among the candidates (runs repeat)")] = 0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov (Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models",
    arXiv 2505.22617, §4): the PPO clipped loss, with the gradient of a few high-covariance tokens cut. A token's
    covariance is (A - mean A)(logp - mean logp) over the batch's valid tokens; the candidates are the tokens the
    clip left alone whose covariance lies strictly inside (cov_low, cov_high), and max(1, int(clip_ratio * valid
    tokens)) of them, drawn at random (seeded), get zero loss and gradient. Entropy falls with this covariance,
    so cutting its largest terms slows the collapse. The cut tokens count in clip_frac."""
    if cov_low >= cov_high:
        raise ValueError(f"clip_cov: cov_low {cov_low} must be below cov_high {cov_high}")
    valid = x.mask.bool()
    ratio = torch.exp(_log_ratio(x.logprobs, x.old_logprobs, valid))
    loss, low, high = _clipped_surrogate(ratio, x.advantages, eps_low, eps_high, None)
    cov = _covariance(x, valid)
    candidates = (valid & ~(low | high) & (cov > cov_low) & (cov < cov_high)).flatten().nonzero().squeeze(-1)
    cut = torch.zeros(valid.numel(), dtype=torch.bool, device=valid.device)
    if len(candidates):
        k = max(1, int(clip_ratio * int(valid.sum())))
        draw = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:k]
        cut[candidates[draw.to(candidates.device)]] = True
    cut = cut.view_as(valid)
    loss, metrics = _finish(torch.where(cut, torch.zeros_like(loss), loss), valid, x.is_weights, ratio, low, high)
    metrics["clip_frac"] = (low | high | cut).to(loss.dtype) * valid
    return loss, metrics


@POLICY_LOSSES.register("kl_cov")
def kl_cov(
    x: PolicyLossInputs, *, kl_ratio: CovFraction = 2e-4,
    kl_coef: Annotated[float, Field(ge=0, description="weight of |logp - logp_old| on the selected tokens")] = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-Cov (Cui et al., arXiv 2505.22617, §4): the unclipped surrogate -A r on every token, plus
    kl_coef |logp - logp_old| on the max(1, int(kl_ratio * valid tokens)) tokens of largest covariance
    (A - mean A)(logp - mean logp) over the batch's valid tokens: a KL-like leash on exactly the tokens that drive
    entropy down. The leashed tokens count in clip_frac (nothing is clipped otherwise)."""
    valid = x.mask.bool()
    log_ratio = _log_ratio(x.logprobs, x.old_logprobs, valid)
    ratio = torch.exp(log_ratio)
    cov = _covariance(x, valid).flatten()
    leashed = torch.zeros_like(cov, dtype=torch.bool)
    n_valid = int(valid.sum())
    if n_valid:
        leashed[torch.topk(cov, max(1, int(kl_ratio * n_valid))).indices] = True
    leashed = leashed.view_as(valid) & valid
    loss = -x.advantages * ratio + kl_coef * log_ratio.abs() * leashed
    never = torch.zeros_like(valid)
    loss, metrics = _finish(loss, valid, x.is_weights, ratio, never, never)
    metrics["clip_frac"] = leashed.to(loss.dtype)
    return loss, metrics
