import pytest

from posttrain.algos.controllers import adapt_in_band, should_reset_reference

BAND = {"target_low": 0.3, "target_high": 0.6, "step_size": 0.02}


@pytest.mark.parametrize(
    ("eps", "entropy", "expected"),
    [
        (0.28, 0.1, 0.30),  # entropy below the band: explore, raise eps_high
        (0.28, 0.9, 0.26),  # above: lower it
        (0.28, 0.45, 0.28),  # inside: unchanged
        (0.28, 0.3, 0.28),  # band edges count as inside
        (0.28, 0.6, 0.28),
        (0.39, 0.1, 0.40),  # clamped at max_eps
        (0.21, 0.9, 0.20),  # clamped at min_eps
    ],
)
def test_adapt_in_band(eps, entropy, expected):
    got = adapt_in_band(eps, entropy, **BAND, lo=0.2, hi=0.4)
    assert got == pytest.approx(expected)


def test_empty_band_is_an_error():
    with pytest.raises(ValueError, match="target_low=0.7 > target_high=0.6"):
        adapt_in_band(0.2, 0.5, target_low=0.7, target_high=0.6, step_size=0.1, lo=0.1, hi=0.5)


def test_periodic_reset():
    assert not should_reset_reference(199, 0, [], every=200)
    assert should_reset_reference(200, 0, [], every=200)
    assert not should_reset_reference(350, 200, [], every=200)
    assert not should_reset_reference(10_000, 0, [])  # every rule off


def test_kl_trigger_resets_only_above_its_threshold_and_only_when_measured():
    assert should_reset_reference(5, 0, [], kl=0.21, max_kl=0.2)
    assert not should_reset_reference(5, 0, [], kl=0.2, max_kl=0.2)  # at the threshold: not above it
    assert not should_reset_reference(5, 0, [], kl=None, max_kl=0.2)  # no KL measured this step
    assert not should_reset_reference(5, 0, [], kl=9.0)  # the rule is off at max_kl = 0


HISTORY = [(0, 0.30), (50, 0.40), (100, 0.45), (150, 0.44), (200, 0.45), (250, 0.452), (300, 0.50)]


def test_stagnation_reset_counts_consecutive_non_improvements():
    # after 100 (best 0.45): 150 -> 0.44 miss, 200 -> 0.45 miss (not strictly better)
    assert should_reset_reference(200, 0, HISTORY, patience=2)
    assert not should_reset_reference(200, 0, HISTORY, patience=3)
    # 250 -> 0.452 beats 0.45 by more than 0: the streak resets
    assert not should_reset_reference(250, 0, HISTORY, patience=2)
    # with min_delta 0.01, 0.452 is a third miss
    assert should_reset_reference(250, 0, HISTORY, patience=3, min_delta=0.01)
    # 300 -> 0.50 improves: no reset
    assert not should_reset_reference(300, 0, HISTORY, patience=1, min_delta=0.01)


def test_stagnation_only_looks_after_the_last_reset():
    # reset at 150: baseline 0.44 at step 150, then 0.45 and 0.452 both improve on it
    assert not should_reset_reference(250, 150, HISTORY, patience=1)
    # reset at 250: baseline 0.452, nothing after it yet
    assert not should_reset_reference(250, 250, HISTORY, patience=1)
    # evaluations after `step` are ignored, and the history need not be sorted
    assert should_reset_reference(200, 0, list(reversed(HISTORY)), patience=2)


def test_small_gains_accumulate_against_min_delta():
    # +0.006 each time: each step alone is under min_delta 0.01, but 0.412 beats the 0.40 best by 0.012
    history = [(0, 0.40), (1, 0.406), (2, 0.412)]
    assert should_reset_reference(1, 0, history, patience=1, min_delta=0.01)
    assert not should_reset_reference(2, 0, history, patience=1, min_delta=0.01)


def test_step_before_last_reset_is_an_error():
    with pytest.raises(ValueError, match="step 5 is before the last reset at step 10"):
        should_reset_reference(5, 10, [], every=1)
