"""Preference losses on (chosen, rejected) pairs: ``fn(x: PreferenceInputs, **hp) -> (loss (P,), metrics)``.

Every entry sees sequence log-likelihoods (sums over completion tokens) of both answers of P pairs under the
policy, and under the frozen reference where the loss has one (trait ``needs_reference=True``). It returns the
per-pair loss (the stage averages it over the step's pairs) and per-pair metrics: the implicit rewards of the
chosen and rejected answers (`chosen_reward`, `rejected_reward`), from which the stage reports the margin and
the accuracy (how often the chosen answer's implicit reward is higher).

h = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l)) below: the log-ratio margin.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from posttrain.registry import Registry

Beta = Annotated[float, Field(gt=0, description="inverse temperature β of the implicit reward β log(π/π_ref)")]


@dataclass(frozen=True)
class PreferenceInputs:
    chosen_logps: Tensor  # (P,) Σ_t log π_θ of the chosen answer; carries the gradient
    rejected_logps: Tensor  # (P,) the same for the rejected answer
    chosen_tokens: Tensor  # (P,) completion tokens of the chosen answer
    rejected_tokens: Tensor  # (P,)
    ref_chosen_logps: Tensor | None = None  # (P,) under the frozen reference (losses with needs_reference)
    ref_rejected_logps: Tensor | None = None

    def __post_init__(self) -> None:
        p = self.chosen_logps.shape
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.shape != p:
                raise ValueError(f"PreferenceInputs.{f.name} has shape {tuple(v.shape)}, expected {tuple(p)}")

    def log_ratios(self) -> tuple[Tensor, Tensor]:
        """(log π/π_ref of chosen, of rejected), each (P,)."""
        if self.ref_chosen_logps is None or self.ref_rejected_logps is None:
            raise ValueError("this preference loss needs the reference's logprobs (ref_chosen_logps, ...)")
        return self.chosen_logps - self.ref_chosen_logps, self.rejected_logps - self.ref_rejected_logps


class PreferenceLossFn(Protocol):
    def __call__(self, x: PreferenceInputs, **hyperparameters: object) -> tuple[Tensor, dict[str, Tensor]]: ...


PREFERENCE_LOSSES: Registry[PreferenceLossFn] = Registry("preference loss")


def _rewards(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    return {"chosen_reward": chosen.detach(), "rejected_reward": rejected.detach()}


@PREFERENCE_LOSSES.register("dpo", needs_reference=True)
def dpo(x: PreferenceInputs, *, beta: Beta = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO (Rafailov et al., arXiv 2305.18290, eq. 7): -log σ(β h). Implicit reward β log(π/π_ref)."""
    c, r = x.log_ratios()
    return -F.logsigmoid(beta * (c - r)), _rewards(beta * c, beta * r)


@PREFERENCE_LOSSES.register("cdpo", needs_reference=True)
def cdpo(x: PreferenceInputs, *, beta: Beta = 0.1,
         label_smoothing: Annotated[float, Field(ge=0, lt=0.5, description="ε: the assumed probability that a "
                                                 "pair's label is flipped")] = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """Conservative DPO (Mitchell, "A note on DPO with noisy preferences", 2023): -(1 - ε) log σ(β h) - ε log σ(-β h),
    DPO against labels smoothed by ε; ε = 0 is DPO. Not TRL 1.16's `label_smoothing`, which feeds its `robust` loss
    (robust DPO, Chowdhury et al., arXiv 2403.00409: [-(1 - ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε), an unbiased
    estimate of the clean-label loss), a different function of h."""
    c, r = x.log_ratios()
    h = beta * (c - r)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h), _rewards(beta * c, beta * r)


@PREFERENCE_LOSSES.register("ipo", needs_reference=True)
def ipo(x: PreferenceInputs, *, beta: Beta = 0.1) -> tuple[Tensor, dict[str, Tensor]]:
    """IPO (Azar et al., arXiv 2310.12036, eq. 17): (h - 1/(2β))², a squared loss that keeps the margin at
    1/(2β) instead of pushing it to infinity on deterministic preferences. h on summed logprobs, as in the paper
    (TRL averages them per token for IPO)."""
    c, r = x.log_ratios()
    return (c - r - 1 / (2 * beta)) ** 2, _rewards(beta * c, beta * r)


@PREFERENCE_LOSSES.register("simpo", needs_reference=False)
def simpo(x: PreferenceInputs, *, beta: Annotated[float, Field(gt=0, description="scale β of the length-normalised "
                                                               "reward")] = 2.0,
          gamma: Annotated[float, Field(ge=0, description="target reward margin γ")] = 1.0
          ) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO (Meng et al., arXiv 2405.14734, eq. 6): -log σ(β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ). No
    reference model: the implicit reward is the length-normalised log-likelihood times β."""
    c = beta * x.chosen_logps / x.chosen_tokens.clamp(min=1)
    r = beta * x.rejected_logps / x.rejected_tokens.clamp(min=1)
    return -F.logsigmoid(c - r - gamma), _rewards(c, r)


def log_odds(mean_logp: Tensor) -> Tensor:
    """log(p / (1 - p)) of p = exp(mean token log-likelihood), computed as a - log(-expm1(a)) so that p near 1
    stays finite; a is capped just below 0 (p = 1 would have infinite odds)."""
    a = mean_logp.clamp(max=-1e-6)
    return a - torch.log(-torch.expm1(a))


@PREFERENCE_LOSSES.register("orpo", needs_reference=False)
def orpo(x: PreferenceInputs, *, lam: Annotated[float, Field(ge=0, description="weight λ of the odds-ratio term "
                                                              "beside the chosen answer's NLL")] = 0.1
         ) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO (Hong et al., arXiv 2403.07691, eqs. 6-7): SFT and preference in one loss, no reference model:
    -ℓ_w + λ (-log σ(log odds(y_w) - log odds(y_l))), with ℓ = the answer's mean token log-likelihood and
    odds(y) = P(y) / (1 - P(y)), P(y) = exp(ℓ). The NLL is averaged per pair here (TRL averages it over the batch's
    tokens, which weights long answers more). Implicit reward λ ℓ, as TRL's."""
    c = x.chosen_logps / x.chosen_tokens.clamp(min=1)
    r = x.rejected_logps / x.rejected_tokens.clamp(min=1)
    return -c - lam * F.logsigmoid(log_odds(c) - log_odds(r)), _rewards(lam * c, lam * r)


def best_and_worst(rewards: Tensor, group_ids: Tensor) -> list[tuple[int, int]]:
    """(chosen row, rejected row) for each group whose rewards are not all equal: its highest-reward sample
    against its lowest (the first in batch order among ties). Groups without both are skipped."""
    pairs = []
    for g in group_ids.unique().tolist():
        rows = (group_ids == g).nonzero().squeeze(-1)
        r = rewards[rows]
        if r.numel() < 2 or bool(r.max() == r.min()):
            continue
        # argmax/argmin return the first occurrence of the extreme value
        pairs.append((int(rows[int(torch.argmax(r))]), int(rows[int(torch.argmin(r))])))
    return pairs
