"""The tensor maths of RL post-training, as registries of small pure functions (STYLE.md §1).

Importing this package fills every registry (typed inputs in inputs.py; hyperparameters are each entry's
keyword-only arguments, see posttrain/registry.py):
  ADVANTAGES      fn(AdvantageInputs, **hp) -> advantages (B,T)
  POLICY_LOSSES   fn(PolicyLossInputs, **hp) -> (loss (B,T), {metric: (B,T)})
  KL_ESTIMATORS   fn(logprobs (B,T), ref_logprobs (B,T)) -> (B,T)
  AGGREGATIONS    fn(per_token (B,T), mask (B,T), *, norm: Normalisers, group_tokens (B,)) -> scalar
  IS_CORRECTIONS  fn(trainer_logprobs, sampler_logprobs, mask, *, cap) -> detached (B,T)
  GROUP_FILTERS   fn(rewards (B,), group_ids (B,)) -> keep (B,) bool
  PREFERENCE_LOSSES fn(PreferenceInputs, **hp) -> (loss (P,), {metric: (P,)})
Distillation (distill.py) adds the `reverse_kl` advantage and KDRL's β schedule and reward-guided mask.
"""

from posttrain.algos.advantages import ADVANTAGES
from posttrain.algos.aggregation import AGGREGATIONS, Normalisers, normalisers_for
from posttrain.algos.controllers import adapt_in_band, should_reset_reference
from posttrain.algos.distill import annealed_coef, distill_row_mask
from posttrain.algos.group_filters import GROUP_FILTERS
from posttrain.algos.inputs import AdvantageInputs, PolicyLossInputs
from posttrain.algos.is_correction import IS_CORRECTIONS, effective_sample_size, mismatch_kl, mismatch_metrics
from posttrain.algos.kl import KL_ESTIMATORS
from posttrain.algos.policy_losses import POLICY_LOSSES
from posttrain.algos.preference import PREFERENCE_LOSSES, PreferenceInputs, best_and_worst
from posttrain.algos.shaping import group_has_variance, group_stats, overlong_penalty

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "GROUP_FILTERS",
    "IS_CORRECTIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "AdvantageInputs",
    "Normalisers",
    "PolicyLossInputs",
    "PreferenceInputs",
    "adapt_in_band",
    "annealed_coef",
    "best_and_worst",
    "distill_row_mask",
    "effective_sample_size",
    "group_has_variance",
    "group_stats",
    "mismatch_kl",
    "mismatch_metrics",
    "normalisers_for",
    "overlong_penalty",
    "should_reset_reference",
]
