"""ProRL-style training controllers (Liu et al., arXiv 2505.24864; ALGORITHMS.md §3): pure decision functions.

The recipe holds the state (the adapted hyperparameter's value, last reset step, validation history) and passes it
in; each function returns the next value. Nothing here mutates hidden state, so a resumed run replays exactly.
"""

from __future__ import annotations

from collections.abc import Sequence


def adapt_in_band(value: float, entropy: float, *, target_low: float, target_high: float, step_size: float,
                  lo: float, hi: float) -> float:
    """Next value of a knob that raises exploration (e.g. the PPO upper clip eps_high): entropy below the band
    raises it by step_size, above lowers it, clamped to [lo, hi].

    DAPO's Clip-Higher (arXiv 2503.14476, §3.1) lets low-probability tokens grow, which counters entropy
    collapse; ProRL fixes eps_high = 0.4. This makes the same knob a feedback loop on the rollout entropy.
    """
    if target_low > target_high:
        raise ValueError(f"entropy band is empty: target_low={target_low} > target_high={target_high}")
    if lo > hi:
        raise ValueError(f"empty clamp range [{lo}, {hi}]")
    if entropy < target_low:  # collapsing: explore more
        value += step_size
    elif entropy > target_high:  # too random: exploit more
        value -= step_size
    return min(max(value, lo), hi)


def should_reset_reference(step: int, last_reset_step: int, val_history: Sequence[tuple[int, float]], *,
                           every: int = 0, patience: int = 0, min_delta: float = 0.0, kl: float | None = None,
                           max_kl: float = 0.0) -> bool:
    """Whether to hard-reset π_ref (and the optimizer) to the current policy, ProRL §2.3.1.

    Three rules, each off at 0:
    - ``max_kl``: the step's measured KL to the reference (``kl``; None when not measured) exceeds it: the KL
      penalty has grown to dominate the loss, which is when ProRL resets.
    - ``every``: a fixed period, step - last_reset_step >= every (ProRL v2 resets every ~200-500 steps).
    - ``patience``: validation stagnation (ProRL v1). ``val_history`` holds (step, held-out reward). Among
      evaluations at steps >= last_reset_step, the first is the baseline; each later one that does not beat
      the best value so far by more than ``min_delta`` is a miss. ``patience`` consecutive misses at the
      end of the history trigger a reset.
    """
    if step < last_reset_step:
        raise ValueError(f"step {step} is before the last reset at step {last_reset_step}")
    if max_kl > 0 and kl is not None and kl > max_kl:
        return True
    if every > 0 and step - last_reset_step >= every:
        return True
    if patience <= 0:
        return False
    values = [v for s, v in sorted(val_history, key=lambda sv: sv[0]) if last_reset_step <= s <= step]
    if not values:
        return False
    best, misses = values[0], 0
    for v in values[1:]:
        # Like Keras EarlyStopping, best moves only on a real improvement, so several small gains that each
        # stay under min_delta still add up to one.
        if v > best + min_delta:
            best, misses = v, 0
        else:
            misses += 1
    return misses >= patience
