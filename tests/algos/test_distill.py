"""On-policy distillation and KDRL maths (algos/distill.py) against exact gradients on tiny vocabularies."""

import itertools

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, AdvantageInputs, PolicyLossInputs
from posttrain.algos.distill import annealed_coef, discounted_to_go, distill_row_mask

D = torch.float64
V = 5


def _student_teacher():
    theta = torch.tensor([0.3, -1.0, 0.8, 0.0, -0.4], dtype=D, requires_grad=True)
    teacher = torch.log_softmax(torch.tensor([1.0, 0.2, -0.5, 0.4, -1.2], dtype=D), -1)
    return theta, teacher


def _exact_grad(fn):
    theta, teacher = _student_teacher()
    fn(torch.log_softmax(theta, -1), teacher).backward()
    return theta.grad


def _reverse_kl(logp, teacher):
    return (logp.exp() * (logp - teacher)).sum()


def _forward_kl(logp, teacher):
    return (teacher.exp() * (teacher - logp)).sum()


def _per_sample_grads(signal_of):
    """d/dθ of the per-sample loss for each of the V outcomes, (V, V), and the outcome probabilities (V,)."""
    theta, teacher = _student_teacher()
    grads = []
    for x in range(V):
        th = theta.detach().clone().requires_grad_(True)
        logp = torch.log_softmax(th, -1)
        signal_of(logp[None, x : x + 1], teacher[None, x : x + 1]).sum().backward()
        grads.append(th.grad)
    return torch.stack(grads), torch.softmax(theta.detach(), -1)


def _sampled_grad(loss_of, n=200_000, seed=0):
    """The gradient of the mean loss over n tokens sampled from the student (Monte Carlo)."""
    theta, teacher = _student_teacher()
    g = torch.Generator().manual_seed(seed)
    x = torch.multinomial(torch.softmax(theta.detach(), -1), n, replacement=True, generator=g)
    logp = torch.log_softmax(theta, -1)[x]
    loss_of(logp[None, :], teacher[x][None, :]).sum().div(n).backward()
    return theta.grad


def _opd_loss(logp, teacher_lp):
    """The OPD signal through the real registry entries: reverse_kl advantage, reinforce policy loss."""
    mask = torch.ones_like(logp)
    adv = ADVANTAGES.get("reverse_kl")(AdvantageInputs(torch.zeros(logp.shape[0], dtype=D),
                                                      torch.arange(logp.shape[0]), mask,
                                                      logprobs=logp.detach(), teacher_logprobs=teacher_lp))
    loss, _ = POLICY_LOSSES.get("reinforce")(PolicyLossInputs(logp, logp.detach(), adv, mask))
    return loss


@pytest.mark.parametrize(("name", "loss_of", "target"), [
    ("opd: reverse_kl advantage + reinforce", _opd_loss, _reverse_kl),
    ("k2 in the loss", lambda lp, t: KL_ESTIMATORS.get("k2")(lp, t), _reverse_kl),
    ("k3 in the loss", lambda lp, t: KL_ESTIMATORS.get("k3")(lp, t), _forward_kl),
    ("k1 in the loss", lambda lp, t: KL_ESTIMATORS.get("k1")(lp, t), lambda lp, t: 0 * lp.sum()),
])
def test_sampled_gradient_matches_the_exact_kl_gradient(name, loss_of, target):
    """Monte Carlo over 200k sampled tokens lands within 5 standard errors of the exact gradient, per component.
    The standard error is computed exactly from the per-outcome gradients, so the tolerance is derived."""
    exact = _exact_grad(target)
    got = _sampled_grad(loss_of)
    per_outcome, probs = _per_sample_grads(loss_of)
    mean = (probs[:, None] * per_outcome).sum(0)
    assert_close(mean, exact, atol=1e-12, rtol=1e-9)  # the estimator's expectation IS the exact gradient
    se = ((probs[:, None] * (per_outcome - mean) ** 2).sum(0) / 200_000).sqrt()
    assert ((got - exact).abs() <= 5 * se + 1e-12).all(), (name, got, exact, se)


def test_k3_gradient_is_not_the_reverse_kl_gradient():
    assert not torch.allclose(_exact_grad(_reverse_kl), _exact_grad(_forward_kl), atol=1e-3)


def _two_token_model():
    """x1 ~ softmax(a), x2 | x1 ~ softmax(b[x1]) over 3 tokens; teacher tables likewise."""
    a = torch.tensor([0.5, -0.3, 0.1], dtype=D, requires_grad=True)
    b = torch.tensor([[0.2, 0.9, -0.4], [-1.0, 0.0, 0.6], [0.3, 0.3, -0.8]], dtype=D, requires_grad=True)
    ta = torch.log_softmax(torch.tensor([0.9, 0.1, -0.6], dtype=D), -1)
    tb = torch.log_softmax(torch.tensor([[1.0, -0.5, 0.0], [0.0, 0.4, -0.2], [-0.7, 0.8, 0.1]], dtype=D), -1)
    return a, b, ta, tb


def _sequences(a, b, ta, tb):
    seqs = list(itertools.product(range(3), range(3)))
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    logp = torch.stack([torch.stack([la[x1], lb[x1, x2]]) for x1, x2 in seqs])  # (9, 2)
    teach = torch.stack([torch.stack([ta[x1], tb[x1, x2]]) for x1, x2 in seqs])
    return logp, teach


@pytest.mark.parametrize("discount", [0.0, 1.0])
def test_discount_one_is_the_exact_sequence_kl_gradient_and_zero_is_not(discount):
    """Enumerating all 9 two-token samples: the expected OPD gradient with discount = 1 equals ∇ KL(π_θ || π_T) of
    the whole sequence; discount = 0 (Tinker's default, lower variance) credits each token only with its own KL
    and leaves out the future-KL term of the first token."""
    a, b, ta, tb = _two_token_model()
    logp, teach = _sequences(a, b, ta, tb)
    seq_lp = logp.sum(-1)
    exact_kl = (seq_lp.exp() * (seq_lp - teach.sum(-1))).sum()
    ga, gb = torch.autograd.grad(exact_kl, (a, b))

    a2, b2, _, _ = _two_token_model()
    logp2, _ = _sequences(a2, b2, ta, tb)
    mask = torch.ones_like(logp2)
    adv = ADVANTAGES.get("reverse_kl")(AdvantageInputs(torch.zeros(9, dtype=D), torch.arange(9), mask,
                                                      logprobs=logp2.detach(), teacher_logprobs=teach),
                                       discount=discount)
    per_token, _ = POLICY_LOSSES.get("reinforce")(PolicyLossInputs(logp2, logp2.detach(), adv, mask))
    weights = logp2.detach().sum(-1).exp()  # the probability of each sample: the expectation, exactly
    ea, eb = torch.autograd.grad((weights * per_token.sum(-1)).sum(), (a2, b2))
    if discount == 1.0:
        assert_close(ea, ga)
        assert_close(eb, gb)
    else:
        assert_close(eb, gb)  # the last token's credit is its own KL either way
        assert not torch.allclose(ea, ga, atol=1e-4)


def test_reverse_kl_advantage_values_mixing_and_masking():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.1, 0.0]])
    t = torch.tensor([[-0.5, -2.5, -0.5], [-1.2, -0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    x = AdvantageInputs(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), mask, logprobs=lp, teacher_logprobs=t)
    adv = ADVANTAGES.get("reverse_kl")
    assert_close(adv(x), torch.tensor([[0.5, -0.5, 0.0], [-1.0, -0.2, 0.0]]))
    assert_close(adv(x, coef=2.0, discount=0.5), 2 * torch.tensor([[0.5 - 0.25, -0.5, 0.0], [-1.1, -0.2, 0.0]]))
    grpo = ADVANTAGES.get("grpo")(x)  # rewards 1, 0 in one group: +-0.7071 on every valid token
    assert_close(adv(x, reward_advantage="grpo", reward_coef=0.5), adv(x) + 0.5 * grpo)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        adv(AdvantageInputs(torch.tensor([1.0]), torch.tensor([0]), mask[:1], logprobs=lp[:1]))
    assert ADVANTAGES.trait("reverse_kl", "needs_teacher") and not ADVANTAGES.trait("reverse_kl", "group_relative")


def test_discounted_to_go_by_hand():
    v = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert_close(discounted_to_go(v, m, 0.0), torch.tensor([[1.0, 2.0, 4.0, 0.0]]))
    assert_close(discounted_to_go(v, m, 1.0), torch.tensor([[7.0, 6.0, 4.0, 0.0]]))
    assert_close(discounted_to_go(v, m, 0.5), torch.tensor([[1 + 1 + 1, 2 + 2, 4.0, 0.0]]))


def test_annealed_coef_schedules():
    assert annealed_coef(5e-3, 1e-3, 0, 100) == pytest.approx(5e-3)
    assert annealed_coef(5e-3, 1e-3, 50, 100) == pytest.approx(3e-3)
    assert annealed_coef(5e-3, 1e-3, 100, 100) == pytest.approx(1e-3)
    assert annealed_coef(5e-3, 1e-3, 250, 100) == pytest.approx(1e-3)  # stays at the end value
    assert annealed_coef(5e-3, 1e-3, 50, 100, "cosine") == pytest.approx(3e-3)
    assert annealed_coef(5e-3, 1e-3, 25, 100, "cosine") == pytest.approx(5e-3 - 4e-3 * (1 - 0.5 ** 0.5) / 2)
    assert annealed_coef(5e-3, None, 50, 100) == annealed_coef(5e-3, 1e-3, 50, 0) == 5e-3
    assert annealed_coef(5e-3, 1e-3, 50, 100, "constant") == 5e-3


def test_reward_guided_mask_keeps_only_failed_samples():
    correct = torch.tensor([True, False, True, False])
    assert distill_row_mask(correct, "failed").tolist() == [0.0, 1.0, 0.0, 1.0]
    assert distill_row_mask(correct, "all").tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="'all' or 'failed'"):
        distill_row_mask(correct, "correct")
