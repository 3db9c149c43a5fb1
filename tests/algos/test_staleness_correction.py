"""Off-policy corrections on a toy where staleness biases the gradient (ALGORITHMS.md §4c).

A one-token policy over 4 actions with logits θ (the learner, version v) and a stale behaviour policy π_b (the
sampler, version v - k) that drew the samples. Every action is enumerated and weighted by π_b(a), so the
"expected" loss below is exact: no sampling noise. The true gradient is ∇θ E_{π_θ}[r].

- uncorrected (old logprobs recomputed by the learner, no IS weight) follows E_{π_b}[A ∇log π_θ]: biased;
- decoupled PPO (proximal = the learner's recomputation, is_correction = tis with a cap the weights stay under)
  multiplies by π_θ/π_b and is unbiased;
- using the sampler's logprobs as PPO's old policy (recompute_old_logprobs = false) is unbiased while no ratio is
  clipped, and clipping biases it again;
- in sync (π_b = π_θ) every variant is the true gradient.
"""

import pytest
import torch

from posttrain.algos import IS_CORRECTIONS, POLICY_LOSSES, PolicyLossInputs

REWARD = torch.tensor([1.0, 0.0, 0.0, 0.5], dtype=torch.float64)


def true_gradient(theta):
    theta = theta.clone().requires_grad_(True)
    (torch.softmax(theta, -1) * REWARD).sum().backward()
    return theta.grad


def estimated_gradient(theta, behaviour, *, old: str, is_correction: str, eps: float = 0.2, cap: float = 100.0):
    """-∇ of E_{a ~ π_b}[ppo_clip loss of a], with old = "learner" (recomputed, decoupled) or "sampler"."""
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)[:, None]  # (4, 1): one row per action
    sampler_lp = torch.log_softmax(behaviour, -1)[:, None]
    learner_old = logp.detach()
    old_lp = learner_old if old == "learner" else sampler_lp
    pi_b = sampler_lp.exp().squeeze(-1)
    advantages = (REWARD - (pi_b * REWARD).sum())[:, None]  # the group baseline, under the samples' policy
    mask = torch.ones_like(logp)
    weights = IS_CORRECTIONS.get(is_correction)(old_lp, sampler_lp, mask, cap=cap)
    loss, _ = POLICY_LOSSES.get("ppo_clip")(PolicyLossInputs(logp, old_lp, advantages, mask, weights),
                                            eps_low=eps, eps_high=eps)
    (pi_b * loss.squeeze(-1)).sum().backward()
    return -theta.grad


THETA = torch.tensor([0.5, -0.2, 0.1, 0.0], dtype=torch.float64)
STALE = torch.tensor([-0.6, 0.4, 0.3, 0.2], dtype=torch.float64)  # k versions ago: a different preference


def test_in_sync_every_variant_is_the_true_gradient():
    truth = true_gradient(THETA)
    for old in ("learner", "sampler"):
        for corr in ("none", "tis"):
            torch.testing.assert_close(estimated_gradient(THETA, THETA, old=old, is_correction=corr), truth)


def test_staleness_biases_the_uncorrected_gradient():
    truth = true_gradient(THETA)
    biased = estimated_gradient(THETA, STALE, old="learner", is_correction="none")
    assert (biased - truth).norm() > 0.3 * truth.norm()


def test_decoupled_ppo_with_truncated_is_removes_the_bias():
    truth = true_gradient(THETA)
    corrected = estimated_gradient(THETA, STALE, old="learner", is_correction="tis", cap=100.0)
    torch.testing.assert_close(corrected, truth)
    # a cap the weights exceed truncates them: the bias shrinks but does not vanish
    w_max = float((torch.softmax(THETA, -1) / torch.softmax(STALE, -1)).max())
    assert w_max > 1.5
    capped = estimated_gradient(THETA, STALE, old="learner", is_correction="tis", cap=1.5)
    uncorrected = estimated_gradient(THETA, STALE, old="learner", is_correction="none")
    assert 1e-3 < (capped - truth).norm() < (uncorrected - truth).norm()


@pytest.mark.parametrize("eps,unbiased", [(10.0, True), (0.2, False)])
def test_sampler_logprobs_as_old_policy_is_unbiased_only_while_nothing_is_clipped(eps, unbiased):
    truth = true_gradient(THETA)
    got = estimated_gradient(THETA, STALE, old="sampler", is_correction="none", eps=eps)
    if unbiased:
        torch.testing.assert_close(got, truth)
    else:
        assert (got - truth).norm() > 1e-2
