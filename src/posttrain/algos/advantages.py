"""Advantage estimators: ``fn(x: AdvantageInputs, **hyperparameters) -> advantages (B, T)``, zero where mask = 0.

Sequence-level estimators (GRPO and its kin) compute one value per sample and give it to every valid token;
token-level ones (REINFORCE++'s reward-to-go and token whitening, distillation signals) return different values per
token. Conventions: every std is the unbiased (n-1) one, like ``torch.std`` and TRL; a group of size 1 has no
baseline and gets advantage 0 wherever the estimator is group-relative. Estimators that normalise "over the
batch" use exactly the tensors they are given, so call them on the whole rollout batch, never on a micro-batch.

Trait ``group_relative=True`` marks an estimator whose baseline is the other samples of the same prompt: with
group_size = 1 it gives every sample 0 (the config refuses that combination).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, Protocol

import torch
from pydantic import Field
from torch import Tensor

from posttrain.algos.inputs import AdvantageInputs
from posttrain.algos.shaping import group_stats
from posttrain.registry import Registry

Eps = Annotated[float, Field(ge=0, description="added to the std before dividing")]


class AdvantageFn(Protocol):
    def __call__(self, x: AdvantageInputs, **hyperparameters: object) -> Tensor: ...


ADVANTAGES: Registry[AdvantageFn] = Registry("advantage")


def estimator(name: str, **hyperparameters: Any) -> Callable[[AdvantageInputs], Tensor]:
    """The estimator `name` with its hyperparameters bound, as the credit assignment calls it (recipes/rl.py). A
    user's estimator (an import path) is checked on every call (Registry.call): one that raises, or returns
    anything but finite (B, T) advantages like x.mask, is a UserError naming it."""
    return functools.partial(_estimate, name, hyperparameters)


def _estimate(name: str, hyperparameters: dict[str, Any], x: AdvantageInputs) -> Tensor:
    return ADVANTAGES.call(name, x, shape=tuple(x.mask.shape), **hyperparameters)


def per_token(values: Tensor, mask: Tensor) -> Tensor:
    """(B,) sequence values -> (B, T): the same value on every valid token, 0 on the rest."""
    return values[:, None].to(mask.dtype) * mask


def _batch_std(x: Tensor) -> Tensor:
    # Unbiased like the group std; a batch of one sample has no spread, not a NaN.
    return x.std() if x.numel() > 1 else x.new_zeros(())


def whiten_tokens(values: Tensor, mask: Tensor, eps: float) -> Tensor:
    """(values - mean) / (std + eps) over the valid tokens of the whole batch, 0 elsewhere (verl masked_whiten:
    mean and unbiased std over every valid token, so a long sample weighs as many tokens as it has)."""
    valid = mask.bool()
    n = valid.sum()
    if n == 0:
        return torch.zeros_like(values)
    mean = values[valid].mean()
    std = values[valid].std() if n > 1 else values.new_zeros(())
    return torch.where(valid, (values - mean) / (std + eps), torch.zeros_like(values))


@ADVANTAGES.register("grpo", group_relative=True)
def grpo(x: AdvantageInputs, *, eps: Eps = 1e-6) -> Tensor:
    """GRPO (DeepSeekMath, arXiv 2402.03300, §4.1): (r - mean_group) / (std_group + eps)."""
    r = x.sequence_rewards()
    s = group_stats(r, x.group_ids)
    # A singleton has no baseline: 0 explicitly, so eps = 0 cannot turn it into 0/0.
    return per_token(torch.where(s.size > 1, (r - s.mean) / (s.std + eps), torch.zeros_like(r)), x.mask)


def _group_centred(x: AdvantageInputs) -> Tensor:
    r = x.sequence_rewards()
    return r - group_stats(r, x.group_ids).mean  # (B,); a singleton's centred reward is exactly 0


@ADVANTAGES.register("dr_grpo", group_relative=True)
def dr_grpo(x: AdvantageInputs) -> Tensor:
    """Dr. GRPO (arXiv 2503.20783): r - mean_group. No std division, which up-weighted easy/hard prompts."""
    return per_token(_group_centred(x), x.mask)


@ADVANTAGES.register("rloo", group_relative=True)
def rloo(x: AdvantageInputs) -> Tensor:
    """RLOO (Ahmadian et al., arXiv 2402.14740): r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_group).

    The leave-one-out baseline is independent of r_i, so the estimator stays unbiased.
    """
    r = x.sequence_rewards()
    s = group_stats(r, x.group_ids)
    n = s.size.to(r.dtype)
    loo = r - (s.mean * n - r) / (n - 1).clamp(min=1)
    return per_token(torch.where(s.size > 1, loo, torch.zeros_like(loo)), x.mask)


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(x: AdvantageInputs, *, eps: Eps = 1e-6) -> Tensor:
    """REINFORCE++ (Hu, arXiv 2501.03262, eq. 8-10): per-token returns, whitened over every valid token of the batch.

    The return at token t is the outcome reward plus the per-token rewards from t on (reward-to-go, gamma = 1):
    G_t = r + Σ_{i>=t} token_rewards_i, where a KL in the reward gives token_rewards_i = -beta KL_i (eq. 8).
    No per-prompt baseline: the batch mean and std over tokens (eq. 10; verl masked_whiten, OpenRLHF) replace it.
    """
    tr = x.token_rewards if x.token_rewards is not None else torch.zeros_like(x.mask)
    to_go = (tr * x.mask).flip(-1).cumsum(-1).flip(-1)  # (B, T) Σ_{i >= t}
    returns = (x.rewards[:, None].to(x.mask.dtype) + to_go) * x.mask
    return whiten_tokens(returns, x.mask, eps)


@ADVANTAGES.register("reinforce_pp_baseline", group_relative=True)
def reinforce_pp_baseline(x: AdvantageInputs, *, eps: Eps = 1e-6) -> Tensor:
    """REINFORCE++-baseline (arXiv 2501.03262; verl "reinforce_plus_plus_baseline"): the group mean as the
    baseline, then the batch's token-level whitening: whiten_tokens(r - mean_group) on every valid token.

    Per-token rewards enter as a sequence total, as in verl (no reward-to-go).
    """
    return whiten_tokens(per_token(_group_centred(x), x.mask), x.mask, eps)


@ADVANTAGES.register("grpo_passk", group_relative=True)
def grpo_passk(x: AdvantageInputs, *, norm_by_std: bool = True, eps: Eps = 1e-6) -> Tensor:
    """Pass@k training (arXiv 2503.19595; verl "grpo_passk"): only the best sample of each group gets an
    advantage, r_max - r_second_max, divided by the group's std (+ eps) when `norm_by_std`; every other sample 0.

    A tie for the best gives 0 (nothing to prefer); the first best sample in batch order is the one credited.
    """
    r = x.sequence_rewards()
    out = torch.zeros_like(r)
    for g in x.group_ids.unique():
        rows = (x.group_ids == g).nonzero().squeeze(-1)
        if len(rows) < 2:
            continue
        top, idx = torch.topk(r[rows], 2)  # topk keeps the first index among equal values
        gap = top[0] - top[1]
        out[rows[idx[0]]] = gap / (r[rows].std() + eps) if norm_by_std else gap
    return per_token(out, x.mask)


@ADVANTAGES.register("grpo_batch_std", group_relative=True)
def grpo_batch_std(x: AdvantageInputs, *, eps: Eps = 1e-6) -> Tensor:
    """Group-centred, batch-scaled: (r - mean_group) / (std_batch(r - mean_group) + eps).

    ScaleRL (arXiv 2510.13786, §4 "batch-level advantage normalisation") and LitePPO (arXiv 2508.08221):
    a batch-wide scale keeps the Dr. GRPO centring but does not up-weight low-variance prompts.
    Singleton groups contribute their centred value 0 to the batch std.
    """
    centred = _group_centred(x)
    return per_token(centred / (_batch_std(centred) + eps), x.mask)
