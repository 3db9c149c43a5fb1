import pytest
import torch
from torch.testing import assert_close

from posttrain.algos.shaping import group_has_variance, group_stats, overlong_penalty


def test_overlong_penalty_at_the_boundaries():
    # max_len 20, cache 4: free up to 16, then (16 - len)/4, -1 from 20 on and beyond
    lengths = torch.tensor([0, 15, 16, 17, 18, 19, 20, 21, 1000])
    got = overlong_penalty(lengths, max_len=20, cache=4)
    assert_close(got, torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]))


def test_overlong_penalty_dapo_setting_and_zero_cache():
    got = overlong_penalty(torch.tensor([16384, 18432, 20480, 20481]), max_len=20480, cache=4096)
    assert_close(got, torch.tensor([0.0, -0.5, -1.0, -1.0]))
    assert_close(overlong_penalty(torch.tensor([10, 11]), max_len=10, cache=0), torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match="cache=30, max_len=20"):
        overlong_penalty(torch.tensor([1]), max_len=20, cache=30)


def test_group_has_variance_with_continuous_rewards():
    rewards = torch.tensor([0.5, 0.2, 0.501, 0.2, 0.7, 0.3, 0.3 + 1e-8], dtype=torch.float64)
    groups = torch.tensor([0, 1, 0, 1, 2, 3, 3])
    # group 0 spans 1e-3 > tol; group 1 is constant; group 2 is a singleton; group 3 differs by 1e-8 < tol
    assert group_has_variance(rewards, groups).tolist() == [True, False, True, False, False, False, False]
    assert group_has_variance(rewards, groups, tol=1e-9).tolist()[5:] == [True, True]


def test_group_stats_hand_computed():
    values = torch.tensor([1.0, 10.0, 3.0, 20.0, 2.0], dtype=torch.float64)
    groups = torch.tensor([7, 3, 7, 3, 9])
    s = group_stats(values, groups)
    # group 7: (1, 3) mean 2, unbiased std sqrt(2); group 3: (10, 20) mean 15, std sqrt(50); group 9 singleton
    assert_close(s.mean, torch.tensor([2.0, 15.0, 2.0, 15.0, 2.0], dtype=torch.float64))
    assert_close(s.std, torch.tensor([2**0.5, 50**0.5, 2**0.5, 50**0.5, 0.0], dtype=torch.float64))
    assert s.min.tolist() == [1.0, 10.0, 1.0, 10.0, 2.0]
    assert s.max.tolist() == [3.0, 20.0, 3.0, 20.0, 2.0]
    assert s.size.tolist() == [2, 2, 2, 2, 1]
