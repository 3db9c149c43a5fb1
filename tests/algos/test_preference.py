"""Preference losses (algos/preference.py) against their formulas, values and gradients by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import PREFERENCE_LOSSES, PreferenceInputs, best_and_worst

D = torch.float64


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def inputs():
    # log-ratio of chosen +1 (-3 vs -4), of rejected -1 (-5 vs -4): h = 2
    c = torch.tensor([-3.0], dtype=D, requires_grad=True)
    r = torch.tensor([-5.0], dtype=D, requires_grad=True)
    x = PreferenceInputs(c, r, torch.tensor([3.0], dtype=D), torch.tensor([5.0], dtype=D),
                         torch.tensor([-4.0], dtype=D), torch.tensor([-4.0], dtype=D))
    return x, c, r


@pytest.mark.parametrize(("name", "args", "value", "d_chosen"), [
    # -log σ(βh), β = 0.1, h = 2: value log(1 + e^-0.2); d/dc = -β σ(-βh)
    ("dpo", {"beta": 0.1}, math.log1p(math.exp(-0.2)), -0.1 * sigmoid(-0.2)),
    # -(1-ε) log σ(βh) - ε log σ(-βh), ε = 0.1; d/dc = -β[(1-ε) σ(-βh) - ε σ(βh)]
    ("cdpo", {"beta": 0.1, "label_smoothing": 0.1},
     0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2)),
     -0.1 * (0.9 * sigmoid(-0.2) - 0.1 * sigmoid(0.2))),
    # (h - 1/(2β))² = (2 - 5)² = 9; d/dc = 2 (h - 5) = -6
    ("ipo", {"beta": 0.1}, 9.0, -6.0),
    # -log σ(β c/|c| - β r/|r| - γ) = -log σ(2(-1) - 2(-1) - 1) = log(1 + e); d/dc = -(β/|c|) σ(-(-1)) = -(2/3) σ(1)
    ("simpo", {"beta": 2.0, "gamma": 1.0}, math.log1p(math.e), -(2 / 3) * sigmoid(1.0)),
])
def test_loss_values_and_gradients_by_hand(name, args, value, d_chosen):
    x, c, r = inputs()
    loss, metrics = PREFERENCE_LOSSES.get(name)(x, **args)
    assert float(loss.detach()) == pytest.approx(value, rel=1e-12)
    loss.sum().backward()
    assert float(c.grad) == pytest.approx(d_chosen, rel=1e-12)
    if name != "simpo":  # these depend on h only: the rejected gradient mirrors the chosen one
        assert float(r.grad) == pytest.approx(-d_chosen, rel=1e-12)
    assert set(metrics) == {"chosen_reward", "rejected_reward"}


def test_orpo_value_and_gradient_by_hand():
    """chosen: log p = -2 over 4 tokens (ℓ_w = -0.5), rejected: -6 over 3 (ℓ_l = -2); λ = 0.25.
    loss = 0.5 + λ log(1 + e^-z), z = [ℓ_w - log(1 - e^ℓ_w)] - [ℓ_l - log(1 - e^ℓ_l)];
    d/d(chosen sum) = (1/4) [-1 - λ σ(-z) / (1 - e^ℓ_w)], d/d(rejected sum) = (1/3) λ σ(-z) / (1 - e^ℓ_l)."""
    c = torch.tensor([-2.0], dtype=D, requires_grad=True)
    r = torch.tensor([-6.0], dtype=D, requires_grad=True)
    x = PreferenceInputs(c, r, torch.tensor([4.0], dtype=D), torch.tensor([3.0], dtype=D))
    lw, ll, lam = -0.5, -2.0, 0.25
    z = (lw - math.log(1 - math.exp(lw))) - (ll - math.log(1 - math.exp(ll)))
    loss, metrics = PREFERENCE_LOSSES.get("orpo")(x, lam=lam)
    assert float(loss.detach()) == pytest.approx(0.5 + lam * math.log1p(math.exp(-z)), rel=1e-12)
    loss.sum().backward()
    assert float(c.grad) == pytest.approx((-1 - lam * sigmoid(-z) / (1 - math.exp(lw))) / 4, rel=1e-12)
    assert float(r.grad) == pytest.approx(lam * sigmoid(-z) / (1 - math.exp(ll)) / 3, rel=1e-12)
    assert float(metrics["chosen_reward"]) == pytest.approx(lam * lw)
    assert not PREFERENCE_LOSSES.trait("orpo", "needs_reference")


def test_orpo_without_its_odds_term_is_the_chosen_answers_mean_nll_and_stays_finite_near_certainty():
    x = PreferenceInputs(torch.tensor([-3.0, -1e-9]), torch.tensor([-1.0, -4.0]), torch.tensor([3.0, 2.0]),
                         torch.tensor([2.0, 2.0]))
    loss, _ = PREFERENCE_LOSSES.get("orpo")(x, lam=0.0)
    assert_close(loss, torch.tensor([1.0, 5e-10]))
    loss, _ = PREFERENCE_LOSSES.get("orpo")(x, lam=1.0)
    assert torch.isfinite(loss).all()


def test_implicit_rewards():
    x, _, _ = inputs()
    _, m = PREFERENCE_LOSSES.get("dpo")(x, beta=0.5)
    assert float(m["chosen_reward"]) == pytest.approx(0.5) and float(m["rejected_reward"]) == pytest.approx(-0.5)
    _, m = PREFERENCE_LOSSES.get("simpo")(x, beta=2.0, gamma=1.0)
    assert float(m["chosen_reward"]) == pytest.approx(-2.0) and float(m["rejected_reward"]) == pytest.approx(-2.0)


def test_cdpo_with_no_smoothing_is_dpo_and_ipo_is_minimal_at_the_target_margin():
    x, _, _ = inputs()
    assert_close(PREFERENCE_LOSSES.get("cdpo")(x, beta=0.3, label_smoothing=0.0)[0],
                 PREFERENCE_LOSSES.get("dpo")(x, beta=0.3)[0])
    assert float(PREFERENCE_LOSSES.get("ipo")(x, beta=0.25)[0].detach()) == pytest.approx(0.0)  # h = 2 = 1/(2·0.25)


def test_traits_and_missing_reference():
    assert PREFERENCE_LOSSES.trait("dpo", "needs_reference") and not PREFERENCE_LOSSES.trait("simpo",
                                                                                            "needs_reference")
    x = PreferenceInputs(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="reference"):
        PREFERENCE_LOSSES.get("dpo")(x)
    with pytest.raises(ValueError, match="shape"):
        PreferenceInputs(torch.zeros(2), torch.zeros(3), torch.ones(2), torch.ones(2))


def test_best_and_worst_pairs_skip_groups_without_both():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.9, 0.2])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    # group 0: best row 1 (first of the ties), worst row 0; group 1 all equal: skipped; group 2: 6 vs 5
    assert best_and_worst(rewards, groups) == [(1, 0), (6, 5)]
    assert best_and_worst(torch.tensor([1.0]), torch.tensor([0])) == []
