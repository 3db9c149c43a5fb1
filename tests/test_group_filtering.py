"""Group filtering: zero-variance drop (ScaleRL) and DAPO dynamic sampling with refill."""

import itertools

import torch

from posttrain.recipes.rl import Rollouts, collect_groups
from posttrain.records import Completion, Score, Task


def fake_sampler(rewards_by_task: dict[str, list[float]]):
    """Each task id maps to its group's rewards; records which tasks were sampled."""
    calls = []

    def sample(chunk: list[Task], round_: int) -> Rollouts:
        calls.append([t.id for t in chunk])
        tasks, comps, scores, gids = [], [], [], []
        for g, t in enumerate(chunk):
            for r in rewards_by_task[t.id]:
                tasks.append(t)
                comps.append(Completion((1,), (2, 3), (-0.1, -0.2), "stop", "x"))
                scores.append(Score(r, r >= 1.0))
                gids.append(g)
        return Rollouts(tasks, [[1]] * len(tasks), comps, scores, torch.tensor(gids, dtype=torch.long))

    return sample, calls


def task(i):
    return Task(id=f"t{i}", question="q", answer="a", solution="a")


# groups of 4: degenerate (all 0), useful (mixed), degenerate (all 1), useful (continuous, unequal) ...
PATTERN = [[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1], [0.2, 0.2, 0.3, 0.2], [0.5, 0.5, 0.5, 0.5]]
REWARDS = {f"t{i}": PATTERN[i % len(PATTERN)] for i in range(100)}


def test_no_filter_keeps_everything():
    sample, calls = fake_sampler(REWARDS)
    kept, _seen, rounds, consumed = collect_groups(sample, map(task, itertools.count()), prompts_per_step=5,
                                                  group_filter="none", max_refill_rounds=3)
    assert len(kept.completions) == 20 and rounds == 1 and consumed == 5 and calls == [["t0", "t1", "t2", "t3", "t4"]]


def test_zero_variance_drops_degenerate_groups_without_refilling():
    sample, _calls = fake_sampler(REWARDS)
    kept, seen, rounds, consumed = collect_groups(sample, map(task, itertools.count()), prompts_per_step=5,
                                                  group_filter="zero_variance", max_refill_rounds=3)
    assert sorted({t.id for t in kept.tasks}) == ["t1", "t3"]  # t3: continuous rewards with variance count
    assert len(seen.completions) == 20 and rounds == 1 and consumed == 5


def test_dynamic_sampling_refills_to_the_requested_number_of_useful_groups():
    sample, calls = fake_sampler(REWARDS)
    kept, _seen, rounds, consumed = collect_groups(sample, map(task, itertools.count()), prompts_per_step=5,
                                                  group_filter="dynamic_sampling", max_refill_rounds=10)
    ids = [t.id for t in kept.tasks[::4]]
    assert len(ids) == 5 and len(set(ids)) == 5
    assert all(REWARDS[i] in (PATTERN[1], PATTERN[3]) for i in ids)  # only non-degenerate groups
    assert int(kept.group_ids.unique().numel()) == 5  # group ids stay distinct across rounds
    for g in kept.group_ids.unique():
        rewards = torch.tensor([kept.scores[i].reward for i in (kept.group_ids == g).nonzero().squeeze(-1)])
        assert rewards.max() > rewards.min()
    # each round asks for exactly the groups still missing: t0-4 keep t1,t3; t5-7 keep t6; t8-9 keep t8;
    # t10 is degenerate; t11 completes the batch
    assert [len(c) for c in calls] == [5, 3, 2, 1, 1] and rounds == 5 and consumed == 12


def test_dynamic_sampling_stops_after_the_refill_cap():
    sample, _calls = fake_sampler({f"t{i}": [0, 0, 0, 0] for i in range(100)})
    kept, seen, rounds, _consumed = collect_groups(sample, map(task, itertools.count()), prompts_per_step=4,
                                                  group_filter="dynamic_sampling", max_refill_rounds=2)
    assert kept.completions == [] and rounds == 3 and len(seen.completions) == 3 * 16
