"""Per-token estimators of KL(π_θ || π_ref) from tokens sampled from π_θ: ``fn(logprobs, ref_logprobs) -> (B,T)``.

Schulman, "Approximating KL Divergence" (2020, joschu.net/blog/kl-approx.html), with q = π_θ (the sampler of
the tokens), p = π_ref and r = p/q per token. The caller masks padding. Which estimator sits in the loss
matters for the gradient, not only the value: ALGORITHMS.md §5 ("k3 in the loss gives a biased gradient").
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from posttrain.registry import Registry

K3_LOG_RATIO_CLAMP = 20.0


class KLFn(Protocol):
    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor: ...


KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = -log r = log π_θ - log π_ref: unbiased, high variance, negative on about half the tokens."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = ½ (log r)²: biased (second order in the log-ratio), low variance, >= 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r - 1) - log r: unbiased, low variance, >= 0; the GRPO estimator (DeepSeekMath, arXiv 2402.03300).

    The log-ratio log r is clamped to [-20, 20] first (verl clamps the same input in ``low_var_kl``), so one token
    the reference finds impossible cannot overflow exp. The value itself is not clamped: verl additionally clamps
    k3 to [-10, 10], which zeroes the gradient of such a token, and TRL does not; we follow TRL (ALGORITHMS.md
    §14). ``expm1(d) - d`` instead of ``exp(d) - d - 1`` keeps small values exact and never negative in floating
    point (expm1(d) >= d holds after rounding, since d is representable).
    """
    d = (ref_logprobs - logprobs).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)  # (B, T) log r
    return torch.expm1(d) - d
