import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from posttrain.algos import KL_ESTIMATORS, AdvantageInputs
from posttrain.algos.advantages import ADVANTAGES

# Three non-contiguous groups of unequal size:
#   group 0 = rows 0, 2, 4: rewards 1, 0, 1 -> mean 2/3, deviations (1/3, -2/3, 1/3),
#             unbiased var = (1/9 + 4/9 + 1/9) / 2 = 1/3, std = 1/sqrt(3)
#   group 1 = rows 1, 3:    rewards 0, 1    -> mean 1/2, deviations (-1/2, 1/2), var = 1/2 / 1, std = 1/sqrt(2)
#   group 2 = row 5:        reward 0.5      -> singleton, advantage 0
R = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5], dtype=torch.float64)
G = torch.tensor([0, 1, 0, 1, 0, 2])
S3, S2 = math.sqrt(3.0), math.sqrt(2.0)


def adv(name: str, rewards=R, groups=G, eps=0.0) -> torch.Tensor:
    """Sequence-level view: one token per sample, so (B, 1) advantages squeeze to (B,)."""
    mask = torch.ones((len(rewards), 1), dtype=rewards.dtype)
    hp = {"eps": eps} if "eps" in ADVANTAGES.hyperparameters(name).model_fields else {}
    return ADVANTAGES.get(name)(AdvantageInputs(rewards, groups, mask), **hp)[:, 0]


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def test_grpo_hand_computed():
    # (1/3) / (1/sqrt 3) = 1/sqrt 3; (-2/3) / (1/sqrt 3) = -2/sqrt 3; (-1/2) / (1/sqrt 2) = -1/sqrt 2
    assert_close(adv("grpo"), t(1 / S3, -1 / S2, -2 / S3, 1 / S2, 1 / S3, 0.0))


def test_grpo_eps_goes_on_the_std():
    # group 1 std 1/sqrt2; with eps = 0.1: 0.5 / (0.70711 + 0.1)
    got = adv("grpo", eps=0.1)
    assert_close(got[3], torch.tensor(0.5 / (1 / S2 + 0.1), dtype=torch.float64))


def test_dr_grpo_hand_computed():
    assert_close(adv("dr_grpo"), t(1 / 3, -1 / 2, -2 / 3, 1 / 2, 1 / 3, 0.0))


def test_rloo_hand_computed():
    # row 0: 1 - mean(0, 1) = 1/2; row 2: 0 - mean(1, 1) = -1; row 1: 0 - 1 = -1; row 3: 1 - 0 = 1; singleton 0
    assert_close(adv("rloo"), t(1 / 2, -1.0, -1.0, 1.0, 1 / 2, 0.0))


def test_reinforce_pp_hand_computed():
    # batch mean 3.5/6 = 7/12; deviations (5, -7, -7, 5, 5, -1)/12; Σdev² = (75 + 98 + 1)/144 = 174/144;
    # unbiased var = 174/144/5 = 174/720
    std = math.sqrt(174 / 720)
    assert_close(adv("reinforce_pp"), t(5, -7, -7, 5, 5, -1) / 12 / std)


def test_grpo_batch_std_hand_computed():
    # centred = (1/3, -1/2, -2/3, 1/2, 1/3, 0), mean 0, Σc² = 2/3 + 1/2 = 7/6, unbiased var = 7/30
    std = math.sqrt(7 / 30)
    assert_close(adv("grpo_batch_std"), t(1 / 3, -1 / 2, -2 / 3, 1 / 2, 1 / 3, 0.0) / std)


def test_all_equal_group_gives_zero_advantage_for_every_estimator_but_global_ones():
    r = t(0.7, 0.7, 0.7, 0.2, 0.9)
    g = torch.tensor([0, 0, 0, 1, 1])
    for name in ("grpo", "dr_grpo", "rloo", "grpo_batch_std", "reinforce_pp_baseline"):
        assert_close(adv(name, r, g, eps=1e-6)[:3], t(0.0, 0.0, 0.0), msg=name)


def test_single_sample_batch_is_zero_not_nan():
    for name in ADVANTAGES.names():
        if ADVANTAGES.trait(name, "needs_teacher"):  # a teacher's signal needs no baseline (test_distill.py)
            continue
        assert_close(adv(name, t(0.3), torch.tensor([4]), eps=1e-6), t(0.0), msg=name)


groups_strategy = st.lists(
    st.tuples(st.integers(0, 4), st.floats(-3, 3, allow_nan=False, width=32)), min_size=2, max_size=12
)


@settings(max_examples=40, deadline=None)
@given(groups_strategy)
def test_identities_against_explicit_loops(rows):
    g = torch.tensor([gid for gid, _ in rows])
    r = torch.tensor([x for _, x in rows], dtype=torch.float64)
    mean = torch.stack([r[g == gi].mean() for gi in g])
    std = torch.stack([r[g == gi].std() if (g == gi).sum() > 1 else torch.tensor(0.0).double() for gi in g])
    eps = 1e-6
    # dr_grpo is grpo without the std division
    assert_close(adv("grpo", r, g, eps) * (std + eps), adv("dr_grpo", r, g, eps))
    # rloo against an explicit leave-one-out loop
    loo = []
    for i in range(len(r)):
        others = [r[j] for j in range(len(r)) if j != i and g[j] == g[i]]
        loo.append(r[i] - torch.stack(others).mean() if others else torch.tensor(0.0).double())
    assert_close(adv("rloo", r, g, eps), torch.stack(loo))
    # grpo_batch_std: group-centred values over their own unbiased batch std
    centred = r - mean
    assert_close(adv("grpo_batch_std", r, g, eps), centred / (centred.std() + eps))
    # every group-relative advantage sums to zero within each group
    for name in ("grpo", "dr_grpo", "rloo", "grpo_batch_std", "reinforce_pp_baseline"):
        a = adv(name, r, g, eps)
        for gi in g.unique():
            assert abs(float(a[g == gi].sum())) < 1e-6 * max(1.0, float(a.abs().max())), name


# ----- token-level estimators: (B, T) with ragged lengths ------------------------------------------------------


def ragged(rewards, lengths, groups=None, token_rewards=None) -> AdvantageInputs:
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths], dtype=torch.float64)
    groups = torch.tensor(groups if groups is not None else list(range(len(rewards))))
    return AdvantageInputs(t(*rewards), groups, mask, token_rewards=token_rewards)


def test_reinforce_pp_normalises_over_tokens_not_samples():
    # Rewards [1, 0], lengths [1, 3] (ALGORITHMS.md §14.1; verl masked_whiten): token returns [1 | 0, 0, 0],
    # mean 0.25, unbiased var (0.75^2 + 3 * 0.25^2) / 3 = 0.25, std 0.5 -> +1.5 and -0.5, -0.5, -0.5.
    a = ADVANTAGES.get("reinforce_pp")(ragged([1.0, 0.0], [1, 3]), eps=0.0)
    assert_close(a, torch.tensor([[1.5, 0.0, 0.0], [-0.5, -0.5, -0.5]], dtype=torch.float64))


def test_reinforce_pp_kl_in_the_reward_is_reward_to_go():
    # A 3-token sample and a 1-token sample; k2 per-token KL against the reference, beta = 0.1 (eq. 8):
    # return_t = r - beta * sum_{i >= t} KL_i, so the 3 tokens of one sample get 3 different advantages.
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.2, -1.0, -0.5], [-2.0, 0.0, 0.0]], dtype=torch.float64)
    kl = KL_ESTIMATORS.get("k2")(lp, ref)  # 0.5 * d^2: [0.02, 0.5, 0] and [0.5]
    x = ragged([1.0, 0.0], [3, 1])
    x = AdvantageInputs(x.rewards, x.group_ids, x.mask, token_rewards=-0.1 * kl * x.mask)
    returns = torch.tensor([1 - 0.1 * (0.02 + 0.5), 1 - 0.1 * 0.5, 1.0, -0.1 * 0.5], dtype=torch.float64)
    expected = (returns - returns.mean()) / returns.std()
    a = ADVANTAGES.get("reinforce_pp")(x, eps=0.0)
    assert_close(a[0], expected[:3])
    assert_close(a[1, :1], expected[3:])
    assert a[1, 1:].abs().sum() == 0  # padding stays 0
    assert len(set(a[0].tolist())) == 3


def test_sequence_estimators_see_per_token_rewards_as_a_total():
    # grpo on [1 + (-0.3), 0 + (-0.1)] per group of two: the KL enters as each sample's sum
    tr = torch.tensor([[-0.1, -0.2], [-0.1, 0.0]], dtype=torch.float64)
    x = ragged([1.0, 0.0], [2, 1], groups=[0, 0], token_rewards=tr)
    a = ADVANTAGES.get("dr_grpo")(x)
    # sequence rewards 0.7 and -0.1 (the padded -0.0 is masked), mean 0.3 -> +0.4 on both tokens, -0.4 on one
    assert_close(a, torch.tensor([[0.4, 0.4], [-0.4, 0.0]], dtype=torch.float64))


def test_reinforce_pp_baseline_hand_computed():
    # verl "reinforce_plus_plus_baseline": subtract the group mean, then whiten over the batch's tokens.
    # Group 0 = rewards [1, 0] with lengths [2, 1]; group 1 = [1] alone (centred 0).
    # Centred per token: [0.5, 0.5 | -0.5 | 0], mean 0.125, deviations (0.375, 0.375, -0.625, -0.125),
    # unbiased var = (2 * 0.140625 + 0.390625 + 0.015625) / 3 = 0.229167
    x = ragged([1.0, 0.0, 1.0], [2, 1, 1], groups=[0, 0, 1])
    a = ADVANTAGES.get("reinforce_pp_baseline")(x, eps=0.0)
    tokens = torch.tensor([0.5, 0.5, -0.5, 0.0], dtype=torch.float64)
    expected = (tokens - 0.125) / tokens.std()
    assert_close(a[0], expected[:2])
    assert_close(a[1, :1], expected[2:3])
    assert_close(a[2, :1], expected[3:])
    assert a[1, 1] == 0 and a[2, 1] == 0


def test_every_estimator_is_zero_on_masked_tokens():
    x = ragged([1.0, 0.0, 0.5, 0.0], [3, 1, 2, 2], groups=[0, 0, 1, 1])
    # logprobs a distillation signal needs, with nonzero values under the padding too
    x = AdvantageInputs(x.rewards, x.group_ids, x.mask, logprobs=torch.full(x.mask.shape, -1.0, dtype=torch.float64),
                        teacher_logprobs=torch.full(x.mask.shape, -0.5, dtype=torch.float64))
    for name in ADVANTAGES.names():
        hp = {}
        a = ADVANTAGES.get(name)(x, **hp)
        assert a.shape == x.mask.shape, name
        assert (a[x.mask == 0] == 0).all(), name


def test_inputs_reject_misshapen_tensors():
    import pytest

    with pytest.raises(ValueError, match="token_rewards has shape"):
        AdvantageInputs(t(1.0, 0.0), torch.tensor([0, 0]), torch.ones(2, 3), token_rewards=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="must both be"):
        AdvantageInputs(t(1.0, 0.0), torch.tensor([0]), torch.ones(2, 3))


def test_grpo_passk_credits_only_the_best_sample_of_each_group():
    # group 0 = rows 0, 2, 4: rewards 1, 0, 1 -> a tie for the best: every advantage 0
    # group 1 = rows 1, 3: rewards 0, 1 -> row 3 gets 1 - 0 = 1, over the group std 1/sqrt(2) -> sqrt(2)
    # group 2 = row 5: singleton -> 0
    assert_close(adv("grpo_passk"), t(0.0, 0.0, 0.0, S2, 0.0, 0.0))
    x = AdvantageInputs(t(0.2, 0.9, 0.5), torch.tensor([0, 0, 0]), torch.ones(3, 2, dtype=torch.float64))
    plain = ADVANTAGES.get("grpo_passk")(x, norm_by_std=False)
    assert_close(plain, torch.tensor([[0.0, 0.0], [0.4, 0.4], [0.0, 0.0]], dtype=torch.float64))  # 0.9 - 0.5
