"""The forking-token mask (algos/forking.py): which tokens the policy gradient keeps, and that the RL loss drops
exactly the others' policy-gradient terms."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algos.aggregation import normalisers_for
from posttrain.algos.forking import top_entropy_mask
from posttrain.recipes.rl import RLBatch, RLLoss
from posttrain.train.learner import ForwardOut


def test_it_keeps_the_highest_entropy_valid_tokens_by_hand():
    entropy = torch.tensor([[0.1, 2.0, 0.5, 9.0], [1.5, 0.2, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # the 9.0 is padding
    # 7 valid tokens, fraction 0.4 -> ceil(2.8) = 3: entropies 3.0, 2.0, 1.5
    assert top_entropy_mask(entropy, mask, 0.4).tolist() == [[0, 1, 0, 0], [1, 0, 1, 0]]
    assert top_entropy_mask(entropy, mask, 1.0).tolist() == mask.tolist()
    assert top_entropy_mask(entropy, mask, 1e-6).tolist() == [[0, 0, 0, 0], [0, 0, 1, 0]]  # at least one
    assert top_entropy_mask(torch.ones(1, 4), torch.ones(1, 4), 0.5).tolist() == [[1, 1, 0, 0]]  # ties: first
    assert top_entropy_mask(entropy, torch.zeros(2, 4), 0.2).sum() == 0
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            top_entropy_mask(entropy, mask, bad)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 9), st.floats(0.01, 1.0), st.integers(0, 10_000))
def test_it_keeps_ceil_fraction_of_the_valid_tokens_and_none_below_one_it_drops(b, t, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    entropy, mask = torch.rand(b, t, generator=g), (torch.rand(b, t, generator=g) < 0.7).float()
    keep = top_entropy_mask(entropy, mask, fraction).bool()
    n = int(mask.sum())
    assert int(keep.sum()) == (max(1, math.ceil(fraction * n)) if n else 0)
    assert not (keep & ~mask.bool()).any()
    dropped = mask.bool() & ~keep
    if keep.any() and dropped.any():
        assert entropy[keep].min() >= entropy[dropped].max()


def test_the_rl_loss_drops_the_policy_gradient_of_exactly_the_low_entropy_tokens():
    """With forking_fraction, the gradient on a dropped token's logprob is the KL term's alone, and a kept token's
    gradient equals the full loss's (the normalisers count every token in both)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    old = -torch.rand(2, 4, generator=g)
    batch = RLBatch(seqs=None, group_ids=torch.tensor([0, 0]), mask=mask, sampler_logprobs=old, old_logprobs=old,
                    ref_logprobs=old - 0.1, is_weights=torch.ones(2, 4), advantages=torch.tensor([[1.0], [-1.0]])
                    .expand(2, 4).clone())
    norm, tokens = normalisers_for(mask, batch.group_ids, 4)
    entropy = torch.tensor([[0.1, 2.0, 0.3, 0.4], [1.0, 0.2, 3.0, 5.0]])

    def grads(fraction: float, kl_coef: float) -> torch.Tensor:
        logprobs = (old + 0.05).requires_grad_()
        loss = RLLoss(batch, norm, tokens, "ppo_clip", {}, "token_mean", "k2", kl_coef, 0.0,
                      forking_fraction=fraction)
        value, metrics = loss(ForwardOut(torch.arange(2), logprobs, mask, entropy))
        value.backward()
        return logprobs.grad, metrics

    kept = top_entropy_mask(entropy, mask, 0.3).bool()  # 7 valid -> 3: entropies 3.0, 2.0, 1.0
    assert kept.tolist() == [[False, True, False, False], [True, False, True, False]]
    full, _ = grads(1.0, 0.0)
    forked, metrics = grads(0.3, 0.0)
    assert metrics["forking_tokens"] == 3 and metrics["forking_entropy"] == pytest.approx(6.0)
    assert torch.equal(forked[kept], full[kept]) and (forked[~kept] == 0).all() and (full[mask.bool()] != 0).all()
    kl_only, _ = grads(0.3, 0.5)
    kl_full, _ = grads(1.0, 0.5)
    assert torch.allclose(kl_only[kept], kl_full[kept])
    assert torch.allclose(kl_only[~kept] * mask[~kept], (kl_full - full)[~kept] * mask[~kept])
