import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from posttrain.algos.aggregation import AGGREGATIONS, Normalisers, normalisers_for

D = torch.float64
# Row sums 10, 11, 7 over lengths 4, 2, 1; rows 0 and 1 share prompt 0. Padding holds garbage (99, nan).
LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 99.0, float("nan")], [7.0, 99.0, 99.0, 99.0]], dtype=D)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=D)
GROUPS = torch.tensor([0, 0, 1])


def test_normalisers_for_hand_computed():
    norm, group_tokens = normalisers_for(MASK, GROUPS, max_len=4)
    assert norm == Normalisers(total_tokens=7, total_seqs=3, total_groups=2, max_len=4)
    assert group_tokens.tolist() == [6, 6, 1]


def test_normalisers_skip_fully_masked_samples_and_groups():
    mask = torch.tensor([[1, 1], [0, 0], [0, 0]])
    norm, group_tokens = normalisers_for(mask, torch.tensor([5, 5, 7]), max_len=2)
    assert norm == Normalisers(total_tokens=2, total_seqs=1, total_groups=1, max_len=2)
    assert group_tokens.tolist() == [2, 2, 0]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("token_mean", 28 / 7),  # (10 + 11 + 7) / 7 tokens
        ("seq_mean_token_mean", (10 / 4 + 11 / 2 + 7 / 1) / 3),  # = 5
        ("seq_mean_token_sum", 28 / 3),
        ("prompt_mean", ((10 + 11) / 6 + 7 / 1) / 2),  # = 5.25
        ("constant", 28 / (3 * 4)),  # Dr. GRPO: N * max_len
    ],
)
def test_aggregations_hand_computed(name, expected):
    norm, group_tokens = normalisers_for(MASK, GROUPS, max_len=4)
    got = AGGREGATIONS.get(name)(LOSS, MASK, norm=norm, group_tokens=group_tokens)
    assert_close(got, torch.tensor(expected, dtype=D))


@pytest.mark.parametrize("name", AGGREGATIONS.names())
def test_all_masked_step_is_zero_not_nan(name):
    mask = torch.zeros(2, 3, dtype=D)
    norm, group_tokens = normalisers_for(mask, torch.tensor([0, 1]), max_len=3)
    got = AGGREGATIONS.get(name)(torch.ones(2, 3, dtype=D), mask, norm=norm, group_tokens=group_tokens)
    assert float(got) == 0.0


def test_negative_count_is_rejected():
    with pytest.raises(ValueError, match="total_tokens must be >= 0, got -1"):
        Normalisers(total_tokens=-1, total_seqs=1, total_groups=1, max_len=1)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 8),  # B
    st.integers(1, 6),  # T
    st.integers(0, 2**31 - 1),  # tensor seed
    st.randoms(use_true_random=False),
)
def test_every_aggregation_is_invariant_to_the_micro_batch_split(b, t, seed, rnd):
    """Σ over micro-batches of the aggregate == aggregate of the full batch, value and gradient, for any
    permutation and chunking of the rows, because every normaliser is global."""
    g = torch.Generator().manual_seed(seed)
    per_token = torch.randn(b, t, generator=g, dtype=D)
    mask = (torch.rand(b, t, generator=g) > 0.4).to(D)
    groups = torch.randint(0, 3, (b,), generator=g)
    norm, group_tokens = normalisers_for(mask, groups, max_len=t)
    rows = list(range(b))
    rnd.shuffle(rows)
    cuts = sorted(rnd.sample(range(1, b), rnd.randint(0, b - 1))) if b > 1 else []
    chunks = [rows[i:j] for i, j in zip([0, *cuts], [*cuts, b], strict=True)]
    for name in AGGREGATIONS.names():
        fn = AGGREGATIONS.get(name)
        x = per_token.clone().requires_grad_(True)
        full = fn(x, mask, norm=norm, group_tokens=group_tokens)
        (g_full,) = torch.autograd.grad(full, x)
        x = per_token.clone().requires_grad_(True)
        split = sum(fn(x[c], mask[c], norm=norm, group_tokens=group_tokens[c]) for c in chunks)
        (g_split,) = torch.autograd.grad(split, x)
        assert_close(split, full, msg=name)
        assert_close(g_split, g_full, msg=name)
