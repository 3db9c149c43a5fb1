"""Rollout collection as a generator: one RL step's scored groups per `next()` (nanochat's `get_batch()` shape).

    batches = collect(engine, sampler, scorer, render, group_size=8, prompts_per_step=32, ...)
    rollouts = next(batches)      # generate, score, filter (and, for a refilling filter, generate more)

Each step asks the TaskSampler for prompts, repeats each `group_size` times, generates, scores, tells the sampler
how every group did, and applies the group filter. A filter with `refill` (DAPO's dynamic sampling) asks for more
prompts until `prompts_per_step` groups are kept or `max_refill_rounds` extra rounds are spent. This function is
the seam an asynchronous producer replaces: the RL step only ever calls `next(batches)`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from posttrain.algos import GROUP_FILTERS, group_has_variance
from posttrain.data.prompts import render_prompt
from posttrain.data.samplers import GroupOutcome, TaskSampler
from posttrain.envs.multiturn import is_multi_turn
from posttrain.envs.scoring import Scorer, info_means
from posttrain.records import Completion, SamplingParams, Score, Task
from posttrain.rollout.base import RolloutEngine
from posttrain.rollout.episodes import episode_summary, run_episodes
from posttrain.tracking.ledger import FlopModel


@dataclass(frozen=True)
class RolloutBatch:
    """Scored samples, B = groups x group_size, flattened group by group."""

    tasks: list[Task]
    prompts: list[list[int]]
    completions: list[Completion]
    scores: list[Score]
    group_ids: Tensor  # (B,) long; unique per group across refill rounds

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def num_groups(self) -> int:
        return int(self.group_ids.unique().numel())

    def rewards(self) -> Tensor:
        return torch.tensor([s.reward for s in self.scores], dtype=torch.float)

    def select(self, keep: Tensor) -> RolloutBatch:
        idx = keep.nonzero().squeeze(-1).tolist()
        return RolloutBatch([self.tasks[i] for i in idx], [self.prompts[i] for i in idx],
                            [self.completions[i] for i in idx], [self.scores[i] for i in idx], self.group_ids[idx])

    def concat(self, other: RolloutBatch) -> RolloutBatch:
        offset = int(self.group_ids.max()) + 1 if len(self.group_ids) else 0  # group ids stay unique
        return RolloutBatch(self.tasks + other.tasks, self.prompts + other.prompts,
                            self.completions + other.completions, self.scores + other.scores,
                            torch.cat([self.group_ids, other.group_ids + offset]))

    def outcomes(self) -> list[GroupOutcome]:
        out = []
        for g in self.group_ids.unique().tolist():
            rows = (self.group_ids == g).nonzero().squeeze(-1).tolist()
            out.append(GroupOutcome(self.tasks[rows[0]], tuple(self.scores[i].reward for i in rows),
                                    tuple(self.scores[i].correct for i in rows)))
        return out


def empty_batch() -> RolloutBatch:
    return RolloutBatch([], [], [], [], torch.zeros(0, dtype=torch.long))


@dataclass(frozen=True)
class StepRollouts:
    """What one step collected."""

    kept: RolloutBatch  # the groups that train
    seen: RolloutBatch  # everything generated this step (metrics and the compute ledger count it all)
    rounds: int  # generation rounds (1 + refills)
    notes: list[str] = field(default_factory=list)  # lines for the run log (e.g. completions that failed to score)
    sampler_state: dict | None = None  # the task sampler right after this step (what a checkpoint after it keeps)
    sampler_metrics: dict[str, float] = field(default_factory=dict)  # a curriculum's curriculum/* for this step
    score_s: float = 0.0  # seconds the verifier took (single-turn environments), part of the collection's time


@dataclass(frozen=True)
class PromptRenderer:
    """A task -> its prompt's token ids, through the environment's prompt and the tokenizer's chat template."""

    env: object
    tokenizer: object
    chat_template: bool = True
    max_len: int | None = None

    def __call__(self, task: Task) -> list[int]:
        return render_prompt(self.tokenizer, self.env.prompt(task), chat_template=self.chat_template,
                             max_len=self.max_len)


def generate_groups(engine: RolloutEngine, scorer: Scorer, render: PromptRenderer, tasks: list[Task],
                    params: SamplingParams, group_size: int, *, heartbeat=None, step: int = 0,
                    clock: dict[str, float] | None = None) -> RolloutBatch:
    """`group_size` scored samples of each task. `heartbeat` (tracking/heartbeat.py), if given, hears each phase;
    `clock`, if given, gets the seconds the verifier took added to clock["score_s"] (a multi-turn environment
    scores each turn inside its episode, so there the episode's time is all generation)."""
    prompts = [render(t) for t in tasks]
    flat_prompts = [p for p in prompts for _ in range(group_size)]
    flat_tasks = [t for t in tasks for _ in range(group_size)]
    if heartbeat is not None:
        heartbeat.phase("generate", f"{len(flat_prompts)} completions of up to {params.max_new_tokens} tokens",
                        step=step)
    if is_multi_turn(scorer.env):  # episodes: the environment scores each turn as it answers
        completions, scores = run_episodes(engine, scorer.env, render.tokenizer, flat_tasks, flat_prompts, params,
                                           chat_template=render.chat_template, max_episode_tokens=render.max_len,
                                           step_timeout_s=scorer.timeout_s)
        scores = scorer.controlled(flat_tasks, [c.text for c in completions], scores, seed=params.seed)
    else:
        completions = engine.generate(flat_prompts, params)
        if heartbeat is not None:
            heartbeat.phase("score", f"verifier of {getattr(scorer.env, 'name', scorer.env)} on "
                            f"{len(completions)} completions", step=step)
        t0 = time.perf_counter()
        scores = scorer(flat_tasks, [c.text for c in completions], seed=params.seed)
        if clock is not None:
            clock["score_s"] = clock.get("score_s", 0.0) + time.perf_counter() - t0
    group_ids = torch.arange(len(tasks)).repeat_interleave(group_size)
    return RolloutBatch(flat_tasks, flat_prompts, completions, scores, group_ids)


def collect(engine: RolloutEngine, sampler: TaskSampler, scorer: Scorer, render: PromptRenderer, *,
            prompts_per_step: int, group_size: int, group_filter: str, max_refill_rounds: int,
            sampling: SamplingParams, seed: int, first_step: int, heartbeat=None) -> Iterator[StepRollouts]:
    """Yield each step's rollouts, forever. Step s (the global step being trained, from `first_step`) samples with
    seed `seed * 1_000_003 + s` (+ 7919 per refill round), so a resumed run draws the same samples."""
    keep_fn, refill = GROUP_FILTERS.get(group_filter), bool(GROUP_FILTERS.trait(group_filter, "refill"))
    step = first_step
    while True:
        kept, seen, rounds, notes, clock = empty_batch(), empty_batch(), 0, [], {"score_s": 0.0}
        while True:
            tasks = sampler.next(prompts_per_step - kept.num_groups)
            params = replace(sampling, seed=seed * 1_000_003 + step + 7919 * rounds)
            new = generate_groups(engine, scorer, render, tasks, params, group_size, heartbeat=heartbeat, step=step,
                                  clock=clock)
            if failed := scorer.failures(new.tasks, new.scores):
                notes.append(failed)
            sampler.observe(new.outcomes(), step=step + 1)
            seen = seen.concat(new)
            kept = kept.concat(new.select(keep_fn(new.rewards(), new.group_ids)))
            rounds += 1
            if not refill or kept.num_groups >= prompts_per_step or rounds > max_refill_rounds:
                break
        # A copy: an asynchronous producer (rollout/producer.py) moves the sampler on before this step trains.
        yield StepRollouts(kept, seen, rounds, notes, copy.deepcopy(sampler.state_dict()),
                           sampler.metrics() if hasattr(sampler, "metrics") else {}, score_s=clock["score_s"])
        step += 1


def generation_flops(flops: FlopModel, batch: RolloutBatch) -> float:
    """Each distinct prompt is prefilled once per group, then every sample decodes on its own (rollout/local.py).
    A multi-turn episode's later turns each prefill the episode's whole context again, then decode."""
    total = 0.0
    for g in batch.group_ids.unique().tolist():
        rows = (batch.group_ids == g).nonzero().squeeze(-1).tolist()
        prompt = len(batch.prompts[rows[0]])
        total += flops.prefill(prompt)
        for i in rows:
            turns = policy_turns(batch.completions[i])
            total += sum(flops.decode_steps(prompt + start, n) + (flops.prefill(prompt + start) if k else 0.0)
                         for k, (start, n) in enumerate(turns))
    return total


def policy_turns(completion: Completion) -> list[tuple[int, int]]:
    """(offset, length) of each run of policy tokens in a completion: one run for a single-turn sample."""
    mask = completion.policy_mask
    if mask is None:
        return [(0, len(completion.token_ids))]
    runs: list[tuple[int, int]] = []
    for i, m in enumerate(mask):
        if m and (not runs or runs[-1][0] + runs[-1][1] != i):
            runs.append((i, 1))
        elif m:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
    return runs


def describe_samples(batch: RolloutBatch, info_keys: Sequence[str] = ()) -> dict[str, float]:
    """Statistics of everything sampled this step (before group filtering); `info_keys`: the environment's
    info_metrics, averaged as rollout/info/<key>."""
    if not len(batch):
        return {"rollout/reward_mean": 0.0, "rollout/pass_rate": 0.0, "rollout/len_mean": 0.0,
                "rollout/truncated_frac": 0.0, "rollout/effective_groups_frac": 0.0, "rollout/samples": 0}
    rewards = batch.rewards()
    n = len(batch)
    controlled = {} if "verifier_reward" not in batch.scores[0].info else {  # env.reward replaced the verifier's
        "rollout/verifier_reward_mean": sum(s.info["verifier_reward"] for s in batch.scores) / n}
    return {
        **controlled,
        **episode_metrics(batch),
        **{f"rollout/info/{k}": v for k, v in info_means(batch.scores, info_keys).items()},
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()) if n > 1 else 0.0,
        "rollout/pass_rate": sum(s.correct for s in batch.scores) / n,
        "rollout/len_mean": sum(len(x.token_ids) for x in batch.completions) / n,
        "rollout/truncated_frac": sum(x.finish_reason == "length" for x in batch.completions) / n,
        "rollout/effective_groups_frac": float(group_has_variance(rewards, batch.group_ids).float().mean()),
        "rollout/samples": n,
        "rollout/score_errors": sum(1 for s in batch.scores if "error" in s.info),
    }


def episode_metrics(batch: RolloutBatch) -> dict[str, float]:
    """episode/* for multi-turn episodes (rollout/episodes.py); {} for single-turn samples."""
    return {f"episode/{k}": v for k, v in episode_summary(batch.completions, batch.scores).items()}


def per_source(batch: RolloutBatch) -> dict[str, float]:
    """rollout/pass_rate/<source> and rollout/reward_mean/<source> for a mixture's sources ([[env.sources]])."""
    by: dict[str, list[Score]] = {}
    for task, score in zip(batch.tasks, batch.scores, strict=True):
        if "source" in task.meta:
            by.setdefault(str(task.meta["source"]), []).append(score)
    out: dict[str, float] = {}
    for source, scores in sorted(by.items()):
        out[f"rollout/pass_rate/{source}"] = sum(s.correct for s in scores) / len(scores)
        out[f"rollout/reward_mean/{source}"] = sum(s.reward for s in scores) / len(scores)
        out[f"rollout/samples/{source}"] = float(len(scores))
    return out
