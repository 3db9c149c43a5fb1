"""head_logprobs: the same values and gradients as logprobs of the full logits, computed in chunks."""

import pytest
import torch

from posttrain.algos.logprobs import head_logprobs, token_entropy, token_logprobs


@pytest.mark.parametrize(("temperature", "chunk"), [(1.0, 3), (0.7, 100), (1.3, 1)])
def test_values_and_gradients_equal_the_full_logits(temperature, chunk):
    g = torch.Generator().manual_seed(0)
    n, h, v = 7, 5, 11
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    a_lp, b_lp = torch.randn(n, generator=g), torch.randn(n, generator=g)  # arbitrary upstream gradients

    lp, ent = head_logprobs(hidden, weight, targets, temperature, chunk=chunk, with_entropy=True)
    (lp * a_lp + ent * b_lp).sum().backward()
    got = (lp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone())

    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    lp2 = token_logprobs(logits[None], targets[None], temperature)[0]
    ent2 = token_entropy(logits[None], temperature)[0]
    (lp2 * a_lp + ent2 * b_lp).sum().backward()
    want = (lp2.detach(), ent2.detach(), hidden.grad, weight.grad)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_without_entropy_only_logprobs_are_computed():
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(6, 3)
    lp, ent = head_logprobs(hidden, weight, torch.tensor([0, 1, 2, 5]))
    assert ent is None and lp.shape == (4,) and bool((lp <= 0).all())
    lp.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
