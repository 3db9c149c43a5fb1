"""RLP's maths (algos/rlp.py) on hand-built values, and the stage's loss on hand-built logits."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algos import normalisers_for
from posttrain.algos.rlp import ema_update_, information_gain, loo_advantages, relative_distance, thought_mask
from posttrain.recipes.rlp import ThoughtLoss
from posttrain.train.learner import ForwardOut


def test_information_gain_is_the_mean_logprob_difference_over_real_target_tokens():
    with_thought = torch.tensor([[-0.5, -1.0], [-2.0, 0.0]])
    no_thought = torch.tensor([[-1.5, -1.5], [-1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # row 1 has one target token; its padding is ignored
    assert torch.allclose(information_gain(with_thought, no_thought, mask), torch.tensor([0.75, -1.0]))


def test_loo_advantage_has_the_g_over_g_minus_1_factor_and_equals_the_leave_one_out_baseline():
    r = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    a = loo_advantages(r, g)
    # group 0: mean 3, G = 3 -> 3/2 * (r - 3) = [-3, -1.5, 4.5]; group 1: no variance -> 0
    assert torch.allclose(a, torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0]))
    assert torch.allclose(a[0], r[0] - (r[1] + r[2]) / 2)  # r_i minus the mean of the others
    assert loo_advantages(torch.tensor([3.0]), torch.tensor([0])).item() == 0.0  # a group of one: no baseline


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=2, max_size=9))
def test_loo_identity_holds_for_any_group(rewards):
    r = torch.tensor(rewards, dtype=torch.float64)
    a = loo_advantages(r, torch.zeros(len(r), dtype=torch.long))
    loo = torch.stack([r[i] - torch.cat([r[:i], r[i + 1:]]).mean() for i in range(len(r))])
    assert torch.allclose(a, loo, atol=1e-9)
    assert abs(float(a.sum())) < 1e-9


def test_thought_mask_covers_each_rows_thought_tokens_only():
    m = thought_mask(torch.tensor([2, 0, 3]), width=4)
    assert m.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]


def test_the_loss_puts_no_gradient_on_target_tokens():
    # hand-built logits of two rows over a 5-token vocabulary: row 0 = 2 thought + 1 target token, row 1 = 1 + 1
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    tokens = torch.tensor([[1, 3, 4], [2, 0, 0]])
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    lens = torch.tensor([2, 1])
    mask = thought_mask(lens, 3)
    group_ids = torch.tensor([0, 0])
    norm, group_tokens = normalisers_for(mask, group_ids, 2)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3])
    loss, _ = ThoughtLoss(lp.detach(), adv, mask, norm, group_tokens, 0.2)(
        ForwardOut(rows=torch.arange(2), logprobs=lp, mask=torch.ones(2, 3), entropy=None))
    loss.backward()
    grad = logits.grad.abs().sum(-1)
    assert (grad[0, :2] > 0).all() and grad[0, 2] == 0  # row 0: thought positions only
    assert grad[1, 0] > 0 and (grad[1, 1:] == 0).all()
    # at ratio 1 the surrogate is -A averaged over the 3 thought tokens
    assert torch.isclose(loss, torch.tensor(-(1 + 1 - 1) / 3))


def test_ema_update_moves_phi_toward_theta_by_one_minus_decay():
    phi = {"w": torch.tensor([0.0, 10.0]), "steps": torch.tensor([1])}
    theta = {"w": torch.tensor([1.0, 0.0]), "steps": torch.tensor([7])}
    ema_update_(phi, theta, 0.9)
    assert torch.allclose(phi["w"], torch.tensor([0.1, 9.0])) and phi["steps"].item() == 7
    assert relative_distance(phi, theta) == pytest.approx((0.9**2 + 9.0**2) ** 0.5 / 1.0, rel=1e-6)
    ema_update_(phi, theta, 0.0)  # decay 0: the EMA is the policy
    assert relative_distance(phi, theta) == 0.0
