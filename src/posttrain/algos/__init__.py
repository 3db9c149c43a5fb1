"""The tensor maths of RL post-training, as registries of small pure functions (STYLE.md §1).

Importing this package fills every registry:
  ADVANTAGES      fn(rewards (B,), group_ids (B,), *, eps) -> (B,)
  POLICY_LOSSES   fn(logprobs, old_logprobs, advantages, mask, *, is_weights, eps_low, eps_high, dual_clip)
                    -> (loss (B,T), {metric: (B,T)})
  KL_ESTIMATORS   fn(logprobs (B,T), ref_logprobs (B,T)) -> (B,T)
  AGGREGATIONS    fn(per_token (B,T), mask (B,T), *, norm: Normalisers, group_tokens (B,)) -> scalar
  IS_CORRECTIONS  fn(trainer_logprobs, sampler_logprobs, mask, *, cap) -> detached (B,T)
"""

from posttrain.algos.advantages import ADVANTAGES
from posttrain.algos.aggregation import AGGREGATIONS, Normalisers, normalisers_for
from posttrain.algos.controllers import adapt_clip_high, adapt_entropy_coef, should_reset_reference
from posttrain.algos.is_correction import IS_CORRECTIONS, effective_sample_size, mismatch_kl
from posttrain.algos.kl import KL_ESTIMATORS
from posttrain.algos.policy_losses import POLICY_LOSSES
from posttrain.algos.registry import Registry
from posttrain.algos.shaping import group_has_variance, group_stats, overlong_penalty

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "IS_CORRECTIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "Normalisers",
    "Registry",
    "adapt_clip_high",
    "adapt_entropy_coef",
    "effective_sample_size",
    "group_has_variance",
    "group_stats",
    "mismatch_kl",
    "normalisers_for",
    "overlong_penalty",
    "should_reset_reference",
]
