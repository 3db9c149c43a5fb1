import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos.is_correction import IS_CORRECTIONS, effective_sample_size, mismatch_kl

D = torch.float64
# w = π_trainer / π_sampler per token. Row 0: (0.5, 1.5, 3), product 2.25. Row 1: (0.5, 1.5, padding), product 0.75.
W = torch.tensor([[0.5, 1.5, 3.0], [0.5, 1.5, 1000.0]], dtype=D)
SAMPLER = torch.full((2, 3), -2.0, dtype=D)
TRAINER = SAMPLER + W.log()
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=D)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("none", [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]),
        ("tis", [[0.5, 1.5, 2.0], [0.5, 1.5, 1.0]]),  # min(w, 2); padding -> 1
        ("mask", [[0.5, 1.5, 0.0], [0.5, 1.5, 1.0]]),  # w > 2 -> 0
        ("seq_tis", [[2.0, 2.0, 2.0], [0.75, 0.75, 1.0]]),  # min(2.25, 2) and 0.75
        ("seq_mask", [[0.0, 0.0, 0.0], [0.75, 0.75, 1.0]]),  # 2.25 > 2 drops all of row 0
    ],
)
def test_is_corrections_hand_computed(name, expected):
    trainer = TRAINER.clone().requires_grad_(True)
    got = IS_CORRECTIONS.get(name)(trainer, SAMPLER, MASK, cap=2.0)
    assert_close(got, torch.tensor(expected, dtype=D))
    assert not got.requires_grad


def test_cap_changes_the_truncation_point():
    got = IS_CORRECTIONS.get("tis")(TRAINER, SAMPLER, MASK, cap=1.2)
    assert_close(got[0], torch.tensor([0.5, 1.2, 1.2], dtype=D))
    with pytest.raises(ValueError, match="IS cap must be >= 1, got 0.5"):
        IS_CORRECTIONS.get("tis")(TRAINER, SAMPLER, MASK, cap=0.5)


def test_sequence_weights_do_not_overflow_on_long_sequences():
    # 2000 tokens of w = e: the product e^2000 overflows float64 but the log-space truncation does not
    trainer = torch.ones(1, 2000, dtype=D)
    sampler = torch.zeros(1, 2000, dtype=D)
    mask = torch.ones(1, 2000, dtype=D)
    assert_close(IS_CORRECTIONS.get("seq_tis")(trainer, sampler, mask, cap=2.0), torch.full((1, 2000), 2.0, dtype=D))
    assert float(IS_CORRECTIONS.get("seq_mask")(trainer, sampler, mask, cap=2.0).abs().sum()) == 0.0


def test_ess_hand_computed():
    ones = torch.ones(1, 4, dtype=D)
    assert float(effective_sample_size(torch.full((1, 4), 0.3, dtype=D), ones)) == pytest.approx(1.0)
    assert float(effective_sample_size(torch.tensor([[1.0, 0, 0, 0]], dtype=D), ones)) == pytest.approx(1 / 4)
    assert float(effective_sample_size(torch.tensor([[1.0, 1, 0, 0]], dtype=D), ones)) == pytest.approx(1 / 2)
    # (1 + 2 + 3)² / (3 (1 + 4 + 9)) = 36 / 42
    w = torch.tensor([[1.0, 2.0, 3.0, 500.0]], dtype=D)
    assert float(effective_sample_size(w, torch.tensor([[1.0, 1, 1, 0]], dtype=D))) == pytest.approx(6 / 7)


def test_ess_of_one_dominant_weight_approaches_one_over_n():
    n = 100
    w = torch.full((1, n), 1e-3, dtype=D)
    w[0, 0] = 1e3
    got = float(effective_sample_size(w, torch.ones(1, n, dtype=D)))
    assert 1 / n <= got < 1.01 / n


def test_ess_with_nothing_left_is_zero():
    assert float(effective_sample_size(torch.zeros(2, 2), torch.ones(2, 2))) == 0.0
    assert float(effective_sample_size(torch.ones(2, 2), torch.zeros(2, 2))) == 0.0


def test_mismatch_kl_is_the_mean_k3_over_valid_tokens():
    # k3 per token = w - log w - 1 with w = π_trainer/π_sampler, tokens drawn by the sampler
    valid_w = [0.5, 1.5, 3.0, 0.5, 1.5]
    expected = sum(w - math.log(w) - 1 for w in valid_w) / 5
    assert float(mismatch_kl(TRAINER, SAMPLER, MASK)) == pytest.approx(expected, rel=1e-12)
    assert float(mismatch_kl(SAMPLER, SAMPLER, MASK)) == 0.0
