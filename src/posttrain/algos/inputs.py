"""Typed inputs of the advantage estimators and the policy losses: frozen records with checked shapes.

B = samples in the batch, T = completion positions (right-padded). Every (B, T) tensor is aligned with the
completion tokens; `mask` is 1 where a token counts (a real, trained completion token) and 0 on padding and on
tokens that must not be trained (a truncated sample under mask_truncated, an environment's tokens in a multi-turn
episode). Optional fields are what some estimators need and others ignore (a critic's values, a teacher's
logprobs for distillation), so a new estimator that needs one does not change the signature of the others.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor


def _check_shapes(record: object, batch: int, width: tuple[int, ...]) -> None:
    for f in fields(record):  # type: ignore[arg-type]
        value = getattr(record, f.name)
        if not isinstance(value, Tensor) or f.name in ("rewards", "group_ids", "mask"):
            continue
        if tuple(value.shape) != width:
            raise ValueError(f"{type(record).__name__}.{f.name} has shape {tuple(value.shape)}, expected "
                             f"{width} like mask (B = {batch})")


@dataclass(frozen=True)
class AdvantageInputs:
    rewards: Tensor  # (B,) sequence reward of each sample (task reward plus any sequence-level shaping)
    group_ids: Tensor  # (B,) long: samples with one id answered the same prompt
    mask: Tensor  # (B, T) float {0, 1}
    token_rewards: Tensor | None = None  # (B, T) per-token rewards, e.g. -beta * KL_t when the KL is in the reward
    values: Tensor | None = None  # (B, T) a critic's value estimates
    logprobs: Tensor | None = None  # (B, T) the sampling policy's logprobs of the sampled tokens
    teacher_logprobs: Tensor | None = None  # (B, T) a teacher's logprobs of the same tokens

    def __post_init__(self) -> None:
        if self.rewards.dim() != 1 or self.group_ids.shape != self.rewards.shape:
            raise ValueError(f"AdvantageInputs: rewards {tuple(self.rewards.shape)} and group_ids "
                             f"{tuple(self.group_ids.shape)} must both be (B,)")
        if self.mask.dim() != 2 or self.mask.shape[0] != self.rewards.shape[0]:
            raise ValueError(f"AdvantageInputs: mask {tuple(self.mask.shape)} must be (B, T) with B = "
                             f"{self.rewards.shape[0]}")
        _check_shapes(self, self.rewards.shape[0], tuple(self.mask.shape))

    def sequence_rewards(self) -> Tensor:
        """(B,) reward of each whole sample: the sequence reward plus its per-token rewards summed (the form in
        which a sequence-level estimator sees a KL-in-reward penalty: one total per sample, TRL's RLOO)."""
        if self.token_rewards is None:
            return self.rewards
        return self.rewards + (self.token_rewards * self.mask).sum(-1)


@dataclass(frozen=True)
class PolicyLossInputs:
    logprobs: Tensor  # (B, T) log π_θ of the sampled tokens; carries the gradient
    old_logprobs: Tensor  # (B, T) log π_θold (the policy that sampled, as the learner computes it)
    advantages: Tensor  # (B, T)
    mask: Tensor  # (B, T) float {0, 1}
    is_weights: Tensor | None = None  # (B, T) detached sampler-vs-trainer weights (is_correction.py), or None

    def __post_init__(self) -> None:
        if self.logprobs.dim() != 2:
            raise ValueError(f"PolicyLossInputs.logprobs must be (B, T), got {tuple(self.logprobs.shape)}")
        _check_shapes(self, self.logprobs.shape[0], tuple(self.logprobs.shape))
        if tuple(self.mask.shape) != tuple(self.logprobs.shape):
            raise ValueError(f"PolicyLossInputs.mask has shape {tuple(self.mask.shape)}, expected "
                             f"{tuple(self.logprobs.shape)}")
