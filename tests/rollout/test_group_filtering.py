"""Group filtering in the rollout generator: zero-variance drop (ScaleRL) and DAPO dynamic sampling with refill."""

from collections import Counter

import torch

from posttrain.data.samplers import PromptHistory
from posttrain.envs.scoring import Scorer
from posttrain.records import Completion, SamplingParams, Score, Task
from posttrain.rollout.collect import collect


class FakeEngine:
    """Sample k of a prompt says "k": the scorer below looks up that sample's reward."""

    version = 0

    def generate(self, prompts, params):
        seen = Counter()
        out = []
        for p in prompts:
            k = seen[tuple(p)]
            seen[tuple(p)] += 1
            out.append(Completion(tuple(p), (2, 3), (-0.1, -0.2), "stop", str(k)))
        return out


class TableEnv:
    """Task id -> its group's rewards."""

    name = "table"
    isolation = "inline"

    def __init__(self, rewards):
        self.rewards = rewards

    def score(self, task, completion):
        r = self.rewards[task.id][int(completion)]
        return Score(r, r >= 1.0)


class CountingSampler:
    def __init__(self):
        self.calls, self.i, self.history = [], 0, PromptHistory()

    def next(self, n):
        tasks = [task(self.i + j) for j in range(n)]
        self.i += n
        self.calls.append([t.id for t in tasks])
        return tasks

    def observe(self, outcomes, *, step):
        self.history.record(outcomes, step=step)

    def state_dict(self):  # the TaskSampler protocol: collect() snapshots it after every step
        return {"i": self.i, "history": self.history.state_dict()}


def task(i):
    return Task(id=f"t{i}", question="q", answer="a", solution="a")


def first_step(rewards, *, prompts_per_step, group_filter, max_refill_rounds=3):
    sampler = CountingSampler()
    batches = collect(FakeEngine(), sampler, Scorer(TableEnv(rewards)), lambda t: [int(t.id[1:])],
                      prompts_per_step=prompts_per_step, group_size=4, group_filter=group_filter,
                      max_refill_rounds=max_refill_rounds, sampling=SamplingParams(), seed=0, first_step=0)
    return next(batches), sampler


# groups of 4: degenerate (all 0), useful (mixed), degenerate (all 1), useful (continuous, unequal) ...
PATTERN = [[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1], [0.2, 0.2, 0.3, 0.2], [0.5, 0.5, 0.5, 0.5]]
REWARDS = {f"t{i}": PATTERN[i % len(PATTERN)] for i in range(100)}


def test_no_filter_keeps_everything():
    out, sampler = first_step(REWARDS, prompts_per_step=5, group_filter="none")
    assert len(out.kept) == 20 and out.rounds == 1 and sampler.calls == [["t0", "t1", "t2", "t3", "t4"]]


def test_zero_variance_drops_degenerate_groups_without_refilling():
    out, sampler = first_step(REWARDS, prompts_per_step=5, group_filter="zero_variance")
    assert sorted({t.id for t in out.kept.tasks}) == ["t1", "t3"]  # t3: continuous rewards with variance count
    assert len(out.seen) == 20 and out.rounds == 1 and sampler.i == 5
    # the sampler heard about every group, kept or not, at the step being trained (1)
    assert sorted(sampler.history.prompts) == ["t0", "t1", "t2", "t3", "t4"]
    assert sampler.history.prompts["t1"]["visits"] == [[1, 0.25]]


def test_dynamic_sampling_refills_to_the_requested_number_of_useful_groups():
    out, sampler = first_step(REWARDS, prompts_per_step=5, group_filter="dynamic_sampling", max_refill_rounds=10)
    kept = out.kept
    ids = [t.id for t in kept.tasks[::4]]
    assert len(ids) == 5 and len(set(ids)) == 5
    assert all(REWARDS[i] in (PATTERN[1], PATTERN[3]) for i in ids)  # only non-degenerate groups
    assert kept.num_groups == 5  # group ids stay distinct across rounds
    for g in kept.group_ids.unique():
        rewards = torch.tensor([kept.scores[i].reward for i in (kept.group_ids == g).nonzero().squeeze(-1)])
        assert rewards.max() > rewards.min()
    # each round asks for exactly the groups still missing: t0-4 keep t1,t3; t5-7 keep t6; t8-9 keep t8;
    # t10 is degenerate; t11 completes the batch
    assert [len(c) for c in sampler.calls] == [5, 3, 2, 1, 1] and out.rounds == 5 and sampler.i == 12


def test_dynamic_sampling_stops_after_the_refill_cap():
    out, _ = first_step({f"t{i}": [0, 0, 0, 0] for i in range(100)}, prompts_per_step=4,
                        group_filter="dynamic_sampling", max_refill_rounds=2)
    assert len(out.kept) == 0 and out.rounds == 3 and len(out.seen) == 3 * 16


def test_each_step_and_round_samples_with_its_own_seed():
    seeds = []

    class SeedEngine(FakeEngine):
        def generate(self, prompts, params):
            seeds.append(params.seed)
            return super().generate(prompts, params)

    batches = collect(SeedEngine(), CountingSampler(), Scorer(TableEnv({f"t{i}": [0] * 4 for i in range(50)})),
                      lambda t: [1], prompts_per_step=2, group_size=4, group_filter="dynamic_sampling",
                      max_refill_rounds=1, sampling=SamplingParams(), seed=3, first_step=7)
    next(batches), next(batches)
    base = 3 * 1_000_003
    assert seeds == [base + 7, base + 7 + 7919, base + 8, base + 8 + 7919]
