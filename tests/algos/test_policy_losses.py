import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from posttrain.algos.aggregation import AGGREGATIONS, normalisers_for
from posttrain.algos.inputs import PolicyLossInputs
from posttrain.algos.policy_losses import POLICY_LOSSES

D = torch.float64
# Two rows of four tokens, old logprob -1 everywhere; logprob = -1 + log(ratio). Row 1's last token is padding.
RATIO = torch.tensor([[0.5, 1.1, 1.5, 0.7], [0.5, 1.5, 4.0, 2.0]], dtype=D)
OLD = torch.full((2, 4), -1.0, dtype=D)
A = torch.tensor([[1.0, 2.0, 1.0, -1.0], [-1.0, -1.0, -1.0, 1.0]], dtype=D)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=D)
DAPO = {"eps_low": 0.2, "eps_high": 0.28}  # trust region [0.8, 1.28]
CISPO_DAPO = {"min_weight": 0.8, "max_weight": 1.28}  # the same bounds as CISPO's absolute weight caps


def loss_fn(name, lp, old, adv, mask, is_weights=None, **hp):
    """Call a policy loss with the hyperparameters it declares (others are dropped: each entry has its own)."""
    accepted = POLICY_LOSSES.hyperparameters(name).model_fields
    return POLICY_LOSSES.get(name)(PolicyLossInputs(lp, old, adv, mask, is_weights),
                                   **{k: v for k, v in hp.items() if k in accepted})


def run(name, ratio=RATIO, adv=A, mask=MASK, **kw):
    """Loss, metrics and d(Σ loss)/d logprobs."""
    old = torch.full_like(ratio, -1.0)
    lp = (old + ratio.log()).requires_grad_(True)
    loss, metrics = loss_fn(name, lp, old, adv, mask, **kw)
    loss.sum().backward()
    return loss.detach(), metrics, lp.grad


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


def test_ppo_clip_hand_computed():
    loss, m, grad = run("ppo_clip", **DAPO)
    # row 0: max(-0.5, -0.8)=-0.5 | max(-2.2,-2.2) | max(-1.5,-1.28)=-1.28 high | A<0: max(0.7,0.8)=0.8 low
    # row 1: A<0: max(0.5,0.8)=0.8 low | max(1.5,1.28)=1.5 | max(4,1.28)=4 | padding
    assert_close(loss, t([[-0.5, -2.2, -1.28, 0.8], [0.8, 1.5, 4.0, 0.0]]))
    # gradient -A*ratio where unclipped, 0 where the clipped branch won
    assert_close(grad, t([[-0.5, -2.2, 0.0, 0.0], [0.0, 1.5, 4.0, 0.0]]))
    assert_close(m["clip_frac"], t([[0, 0, 1, 1], [1, 0, 0, 0]]))
    assert_close(m["clip_frac_low"], t([[0, 0, 0, 1], [1, 0, 0, 0]]))
    assert_close(m["clip_frac_high"], t([[0, 0, 1, 0], [0, 0, 0, 0]]))
    assert_close(m["ratio"], t([[0.5, 1.1, 1.5, 0.7], [0.5, 1.5, 4.0, 0.0]]))


def test_ppo_dual_clip_caps_negative_advantage_loss():
    loss, m, grad = run("ppo_clip", dual_clip=3.0, **DAPO)
    # only row 1 token 2 (A=-1, ratio 4) exceeds -A*c = 3: capped to 3 and its gradient vanishes
    assert_close(loss, t([[-0.5, -2.2, -1.28, 0.8], [0.8, 1.5, 3.0, 0.0]]))
    assert_close(grad, t([[-0.5, -2.2, 0.0, 0.0], [0.0, 1.5, 0.0, 0.0]]))
    assert_close(m["clip_frac_high"], t([[0, 0, 1, 0], [0, 0, 1, 0]]))
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        run("ppo_clip", dual_clip=1.0)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.01, 50.0), st.floats(-5, 5), st.floats(1.5, 10.0))
def test_dual_clip_is_min_with_minus_a_c_for_negative_advantages(ratio, a, c):
    r, adv = t([[ratio]]), t([[a]])
    plain, *_ = run("ppo_clip", ratio=r, adv=adv, mask=t([[1.0]]))
    dual, *_ = run("ppo_clip", ratio=r, adv=adv, mask=t([[1.0]]), dual_clip=c)
    expected = min(float(plain), -a * c) if a < 0 else float(plain)
    assert float(dual) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_is_weights_multiply_the_loss_and_stay_detached():
    w = t([[2.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.5, 1.0]]).requires_grad_(True)
    loss, _, grad = run("ppo_clip", is_weights=w, **DAPO)
    assert_close(loss, t([[-1.0, -2.2, -1.28, 0.8], [0.8, 1.5, 2.0, 0.0]]))
    assert_close(grad, t([[-1.0, -2.2, 0.0, 0.0], [0.0, 1.5, 2.0, 0.0]]))
    assert w.grad is None


def test_cispo_hand_computed():
    loss, m, grad = run("cispo", **CISPO_DAPO)
    w = t([[0.8, 1.1, 1.28, 0.8], [0.8, 1.28, 1.28, 0.0]])  # clip(ratio, 0.8, 1.28), padding 0
    lp = OLD + RATIO.log()
    assert_close(loss, -w * A * lp)
    # every token keeps a gradient, -sg(w) * A, even the clipped ones
    assert_close(grad, t([[-0.8, -2.2, -1.28, 0.8], [0.8, 1.28, 1.28, 0.0]]))
    assert_close(m["clip_frac"], t([[1, 0, 1, 1], [1, 1, 1, 0]]))
    assert_close(m["clip_frac_low"], t([[1, 0, 0, 1], [1, 0, 0, 0]]))


def test_cispo_without_a_lower_cap_and_scalerl_upper_cap():
    _, m, grad = run("cispo", min_weight=0.0, max_weight=5.0)  # ScaleRL eps_max = 5
    # weights = ratios (all < 5): gradient -ratio * A
    assert_close(grad, t([[-0.5, -2.2, -1.5, 0.7], [0.5, 1.5, 4.0, 0.0]]))
    assert float(m["clip_frac"].sum()) == 0.0


def test_reinforce_hand_computed():
    loss, m, grad = run("reinforce")
    assert_close(loss, -A * (OLD + RATIO.log()) * MASK)
    assert_close(grad, -A * MASK)
    assert float(m["clip_frac"].abs().sum()) == 0.0
    assert_close(m["ratio"], RATIO * MASK)


# GSPO: row 0 has token log-ratios (0.3, 0.0, -0.1) and a padding token; row 1 has 0.1 on all four tokens.
GSPO_LR = t([[0.3, 0.0, -0.1, 5.0], [0.1, 0.1, 0.1, 0.1]])
GSPO_MASK = t([[1, 1, 1, 0], [1, 1, 1, 1]])
GSPO_A = t([[1.0] * 4, [-1.0] * 4])


def test_gspo_hand_computed():
    s0, s1 = math.exp(0.2 / 3), math.exp(0.1)  # 1.0689, 1.1052
    loss, m, grad = run("gspo", ratio=GSPO_LR.exp(), adv=GSPO_A, mask=GSPO_MASK, eps_low=0.05, eps_high=0.05)
    # row 0 (A=+1): max(-1.0689, -1.05) = -1.05, clipped; row 1 (A=-1): max(1.1052, 1.05) = 1.1052
    assert_close(loss, t([[-1.05, -1.05, -1.05, 0.0], [s1] * 4]))
    assert_close(grad, t([[0.0] * 4, [s1] * 4]))  # GSPO-token: d/dlogp_t = -A * s_i
    assert_close(m["ratio"], t([[s0, s0, s0, 0.0], [s1] * 4]))
    assert_close(m["clip_frac_high"], t([[1, 1, 1, 0], [0] * 4]))


def test_gspo_gradient_equals_sequence_level_objective():
    """With seq_mean_token_mean, the GSPO-token loss has the gradient of (1/N) Σ_i max(-A s_i, -A clip(s_i))."""
    lp = (OLD + GSPO_LR).requires_grad_(True)
    loss, _ = loss_fn("gspo", lp, OLD, GSPO_A, GSPO_MASK, eps_low=0.2, eps_high=0.2)
    norm, gt = normalisers_for(GSPO_MASK, torch.tensor([0, 0]), max_len=4)
    agg = AGGREGATIONS.get("seq_mean_token_mean")(loss, GSPO_MASK, norm=norm, group_tokens=gt)
    (g_token,) = torch.autograd.grad(agg, lp)

    lp2 = (OLD + GSPO_LR).requires_grad_(True)
    s = torch.exp(((lp2 - OLD) * GSPO_MASK).sum(-1) / GSPO_MASK.sum(-1))  # (B,) the paper's s_i
    a = GSPO_A[:, 0]
    manual = torch.maximum(-a * s, -a * s.clamp(0.8, 1.2)).mean()
    (g_manual,) = torch.autograd.grad(manual, lp2)
    assert_close(agg, manual)
    assert_close(g_token, g_manual)
    # and by hand: row 0 unclipped, d/dlogp_t = -A s0 / (N |o_0|) = -exp(0.2/3) / (2 * 3)
    assert_close(g_token[0, 0], torch.tensor(-math.exp(0.2 / 3) / 6, dtype=D))


def test_gspo_equals_ppo_clip_when_token_ratios_are_constant_per_sequence():
    ratio = t([[1.5, 1.5, 1.5], [0.9, 0.9, 0.9], [0.5, 0.5, 0.5]])
    adv = t([[1.0] * 3, [-2.0] * 3, [-1.0] * 3])
    mask = torch.ones(3, 3, dtype=D)
    lg, mg, gg = run("gspo", ratio=ratio, adv=adv, mask=mask, **DAPO)
    lp_, mp, gp = run("ppo_clip", ratio=ratio, adv=adv, mask=mask, **DAPO)
    assert_close(lg, lp_)
    assert_close(gg, gp)
    for key in mp:
        assert_close(mg[key], mp[key], msg=key)


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "cispo", "reinforce", "kl_cov"])
def test_on_policy_gradient_is_minus_a_times_is_weight_for_every_loss(name):
    """On-policy (old = sg(logp)) nothing is clipped, so every loss has the policy gradient -A * w per token:
    in particular cispo and ppo_clip agree."""
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(3, 5, generator=g, dtype=D) * 3).requires_grad_(True)
    adv = torch.randn(3, 5, generator=g, dtype=D)
    mask = (torch.rand(3, 5, generator=g) > 0.3).to(D)
    w = torch.rand(3, 5, generator=g, dtype=D) + 0.5
    loss, m = loss_fn(name, lp, lp.detach(), adv, mask, is_weights=w, eps_low=0.2, eps_high=0.28,
                      **CISPO_DAPO)
    loss.sum().backward()
    assert_close(lp.grad, -adv * w * mask)  # kl_cov's |logp - logp_old| has zero gradient at 0
    assert float(m["clip_frac"].sum()) == (1.0 if name == "kl_cov" else 0.0)  # kl_cov reports its leashed token
    assert_close(m["ratio"], mask)


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "cispo", "reinforce", "clip_cov", "kl_cov"])
def test_padding_with_inf_logprobs_gives_zero_loss_and_finite_gradients(name):
    lp = t([[-1.0, -2.0, float("-inf")]]).requires_grad_(True)
    old = t([[-1.2, -1.9, float("-inf")]])
    mask = t([[1.0, 1.0, 0.0]])
    loss, m = loss_fn(name, lp, old, t([[1.0, -1.0, 5.0]]), mask, dual_clip=3.0)
    loss.sum().backward()
    assert float(loss.detach()[0, 2]) == 0.0
    assert torch.isfinite(lp.grad).all() and float(lp.grad[0, 2]) == 0.0
    assert all(float(v[0, 2]) == 0.0 for v in m.values())


def test_each_loss_declares_only_its_own_hyperparameters():
    # eps_high means the PPO clip bound where it exists; CISPO's cap is a separately named absolute weight
    assert list(POLICY_LOSSES.hyperparameters("ppo_clip").model_fields) == ["eps_low", "eps_high", "dual_clip"]
    assert list(POLICY_LOSSES.hyperparameters("gspo").model_fields) == ["eps_low", "eps_high", "dual_clip"]
    assert list(POLICY_LOSSES.hyperparameters("cispo").model_fields) == ["max_weight", "min_weight"]
    assert list(POLICY_LOSSES.hyperparameters("reinforce").model_fields) == []
    assert list(POLICY_LOSSES.hyperparameters("clip_cov").model_fields) == [
        "eps_low", "eps_high", "clip_ratio", "cov_low", "cov_high", "seed"]
    assert list(POLICY_LOSSES.hyperparameters("kl_cov").model_fields) == ["kl_ratio", "kl_coef"]


def test_inputs_reject_misshapen_tensors():
    with pytest.raises(ValueError, match="advantages has shape"):
        PolicyLossInputs(OLD, OLD, A[:, :2], MASK)


# Clip-Cov and KL-Cov (arXiv 2505.22617). On RATIO/A/MASK the 7 valid tokens have mean A = 0, so a token's
# covariance is A (log r - m), m = mean log r = 0.0785093:
#   row 0: -0.771656, 0.033602, 0.326956, 0.435184     row 1: 0.771656, -0.326956, -1.307785, (padding)
COV = t([[-0.771656, 0.033602, 0.326956, 0.435184], [0.771656, -0.326956, -1.307785, float("-inf")]])


def test_the_covariance_is_centred_over_the_valid_tokens():
    from posttrain.algos.policy_losses import _covariance

    old = torch.full_like(RATIO, -1.0)
    x = PolicyLossInputs(old + RATIO.log(), old, A, MASK)
    assert_close(_covariance(x, MASK.bool()), COV, atol=1e-6, rtol=0)


def test_kl_cov_hand_computed():
    # kl_ratio 0.3 of 7 tokens -> 2 leashed: the largest covariances, row 1 token 0 and row 0 token 3
    loss, m, grad = run("kl_cov", kl_ratio=0.3, kl_coef=0.5)
    # -A r everywhere (no clipping), + 0.5 |log r| on the two: |log 0.7| = 0.356675, |log 0.5| = 0.693147
    assert_close(loss, t([[-0.5, -2.2, -1.5, 0.7 + 0.5 * 0.356675], [0.5 + 0.5 * 0.693147, 1.5, 4.0, 0.0]]))
    # d/dlogp: -A r, + 0.5 sign(log r) on the two (both ratios < 1: -0.5)
    assert_close(grad, t([[-0.5, -2.2, -1.5, 0.7 - 0.5], [0.5 - 0.5, 1.5, 4.0, 0.0]]))
    assert_close(m["clip_frac"], t([[0, 0, 0, 1], [1, 0, 0, 0]]))


def test_kl_cov_without_its_coefficient_is_the_unclipped_surrogate():
    loss, _, grad = run("kl_cov", kl_ratio=1.0, kl_coef=0.0)
    assert_close(loss, -A * RATIO * MASK)
    assert_close(grad, -A * RATIO * MASK)


def test_clip_cov_hand_computed():
    # the PPO clip (DAPO bounds) zeroes row 0 tokens 2 and 3 and row 1 token 0; of the others only row 0 token 1
    # (0.0336) lies in (0, 1): one token is cut (max(1, int(2e-4 * 7)) = 1), its loss and gradient 0
    loss, m, grad = run("clip_cov", cov_low=0.0, cov_high=1.0, **DAPO)
    assert_close(loss, t([[-0.5, 0.0, -1.28, 0.8], [0.8, 1.5, 4.0, 0.0]]))
    assert_close(grad, t([[-0.5, 0.0, 0.0, 0.0], [0.0, 1.5, 4.0, 0.0]]))
    assert_close(m["clip_frac"], t([[0, 1, 1, 1], [1, 0, 0, 0]]))
    assert_close(m["clip_frac_high"], t([[0, 0, 1, 0], [0, 0, 0, 0]]))  # the cut is not a ratio clip


def test_clip_cov_never_cuts_a_token_the_clip_already_zeroed():
    # (0.4, 1) holds row 0 token 3 and row 1 token 0, both clipped already: nothing is cut, it is ppo_clip
    got, want = run("clip_cov", cov_low=0.4, cov_high=1.0, **DAPO), run("ppo_clip", **DAPO)
    for g, w in zip(got, want, strict=True):
        if isinstance(g, dict):
            for key in w:
                assert_close(g[key], w[key], msg=key)
        else:
            assert_close(g, w)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1000), ratio=st.floats(0.05, 1.0), draw=st.integers(0, 50))
def test_clip_cov_cuts_the_stated_number_of_band_tokens_and_repeats(seed, ratio, draw):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(4, 6, generator=g, dtype=D) * 3
    old = lp + torch.randn(4, 6, generator=g, dtype=D) * 0.05
    adv = torch.randn(4, 6, generator=g, dtype=D) * 3
    mask = (torch.rand(4, 6, generator=g) > 0.2).to(D)
    band = {"cov_low": -0.5, "cov_high": 2.0, "clip_ratio": ratio, "seed": draw}
    base_loss, base = loss_fn("ppo_clip", lp, old, adv, mask)
    loss, m = loss_fn("clip_cov", lp, old, adv, mask, **band)
    cut = (m["clip_frac"] - base["clip_frac"]).bool()  # tokens cut by covariance, beyond the ratio clip
    from posttrain.algos.policy_losses import _covariance

    cov = _covariance(PolicyLossInputs(lp, old, adv, mask), mask.bool())
    inside = mask.bool() & ~base["clip_frac"].bool() & (cov > -0.5) & (cov < 2.0)
    assert not (cut & ~inside).any()  # only candidates are cut
    assert int(cut.sum()) == (min(int(inside.sum()), max(1, int(ratio * int(mask.sum())))) if inside.any() else 0)
    assert_close(loss, torch.where(cut, torch.zeros_like(base_loss), base_loss))
    again, _ = loss_fn("clip_cov", lp, old, adv, mask, **band)
    assert torch.equal(loss, again)  # seeded: the same inputs cut the same tokens
