"""Adaptive curricula: task samplers that read each prompt's learning history to decide what to sample next.

    [rl]
    sampler = "pools"                       # or no_positive_resampling, pcl, dump (uniform: data/samplers.py)
    sampler_args = {pool_size = 2000, ratios = {learnable = 0.6, new = 0.3, easy = 0.05, hard = 0.05}}

Each sampler draws from a TaskBank: the environment's training stream (or, with `pool_size`, a fixed pool of its
first `pool_size` distinct tasks, a dataset of known size), remembering every task it has handed out. A fresh
task is one never sampled; once the stream or pool is used up the samplers reuse known tasks. Their state is the
number of tasks drawn (the bank is rebuilt by replaying the stream), the history, the random state and the
sampler's own numbers, so a resumed run samples exactly what the uninterrupted one did. The maths (pools, UCB,
the value model) is in algos/curriculum.py; `metrics()` is what the RL stage logs as curriculum/* each step.

Rescue (`rescue_after = n`, every sampler here): a prompt visited n times without a single correct sample is
replaced, the next time it is picked, by the environment's easier variant `env.easier(task)` when it has one
(arithmetic: one digit fewer per operand), a new prompt with its own history.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from pydantic import Field

from posttrain.algos.curriculum import (
    logistic_predict,
    logistic_update,
    mean_abs_advantage,
    nearest_to_target,
    pool_of,
    softmax,
    split_counts,
    stayed_solved,
    ucb_scores,
)
from posttrain.data.samplers import SAMPLERS, GroupOutcome, PromptHistory, distinct_tasks
from posttrain.errors import UserError
from posttrain.records import Task


class TaskBank:
    """Every task handed out so far, by id, and the fresh ones still to come."""

    def __init__(self, env: Any, seed: int, pool_size: int = 0) -> None:
        self.env, self.seed, self.pool_size = env, seed, pool_size
        self.tasks: dict[str, Task] = {}
        self.drawn = 0
        self._stream = distinct_tasks(env.tasks("train", seed), pool_size)
        self._exhausted = False

    def fresh(self) -> Task | None:
        """The next task never handed out, or None when the stream (or pool) is used up."""
        if self._exhausted:
            return None
        task = next(self._stream, None)
        if task is None:
            self._exhausted = True
            if not self.tasks:
                raise UserError(f"environment {self.env.name!r} yields no training tasks")
            return None
        self.tasks[task.id] = task
        self.drawn += 1
        return task

    def add(self, task: Task) -> None:
        """A task that did not come from the stream (a rescue variant)."""
        self.tasks[task.id] = task

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "order": list(self.tasks)}

    def load_state_dict(self, state: dict[str, Any], rebuild: Callable[[str], Task]) -> None:
        """Replay the stream to the same point; `rebuild(id)` makes a task that did not come from it (a rescue
        variant) from those before it. The order of `tasks` is restored too: samplers draw from it at random."""
        self.tasks, self.drawn, self._exhausted = {}, 0, False
        self._stream = distinct_tasks(self.env.tasks("train", self.seed), self.pool_size)
        for _ in range(state["drawn"]):
            if self.fresh() is None:
                raise UserError("cannot resume the task sampler: the environment's training stream is shorter "
                                "than when the checkpoint was written (did env.args or the data file change?)")
        for task_id in state["order"]:
            if task_id not in self.tasks:
                self.tasks[task_id] = rebuild(task_id)
        self.tasks = {i: self.tasks[i] for i in state["order"]}


class HistorySampler:
    """What the curricula share: the bank, the history, a seeded rng, rescue, and the step's metrics."""

    def __init__(self, env: Any, seed: int, *, pool_size: int, rescue_after: int) -> None:
        self.env, self.seed, self.rescue_after = env, seed, rescue_after
        self.bank = TaskBank(env, seed, pool_size)
        self.history = PromptHistory()
        self.rng = random.Random(f"sampler:{seed}")
        self.rescued: dict[str, str] = {}  # rescued task id -> the id of the easier variant that replaces it
        self._metrics: dict[str, float] = {}

    def visits(self, task_id: str) -> list:
        return self.history.prompts.get(task_id, {}).get("visits", [])

    def rescue(self, task: Task) -> Task:
        """The easier variant of a never-solved prompt, when rescue is on and the environment offers one."""
        if not self.rescue_after or not hasattr(self.env, "easier"):
            return task
        while task.id in self.rescued:
            task = self.bank.tasks[self.rescued[task.id]]
        visits = self.visits(task.id)
        if len(visits) < self.rescue_after or any(v[1] > 0 for v in visits):
            return task
        easier = self.variant(task)
        if easier is None or easier.id in self.bank.tasks:
            return task
        self.bank.add(easier)
        self.rescued[task.id] = easier.id
        self._metrics["curriculum/rescued"] = self._metrics.get("curriculum/rescued", 0) + 1
        return easier

    def variant(self, task: Task) -> Task | None:
        easier = self.env.easier(task)
        return None if easier is None else Task(easier.id, easier.question, easier.answer, easier.solution,
                                                easier.difficulty, {**easier.meta, "rescued_from": task.id})

    def next(self, n: int) -> list[Task]:
        self._metrics = {}
        tasks = [self.rescue(t) for t in self.pick(n)]
        fresh = sum(1 for t in tasks if not self.visits(t.id))
        self._metrics.update({"curriculum/new_frac": fresh / max(1, len(tasks)),
                              "curriculum/known_tasks": len(self.bank.tasks)})
        return tasks

    def pick(self, n: int) -> list[Task]:
        raise NotImplementedError

    def fresh_or_known(self, n: int, exclude: set[str]) -> list[Task]:
        """n fresh tasks, topped up with random known ones not in `exclude` once the stream is used up."""
        out = []
        while len(out) < n and (t := self.bank.fresh()) is not None:
            out.append(t)
        if len(out) < n:
            taken = exclude | {t.id for t in out}
            known = [i for i in self.bank.tasks if i not in taken and i not in self.rescued]
            out += [self.bank.tasks[i] for i in self.rng.sample(known, min(n - len(out), len(known)))]
        return out

    def observe(self, outcomes: Sequence[GroupOutcome], *, step: int) -> None:
        self.history.record(outcomes, step=step)

    def metrics(self) -> dict[str, float]:
        """curriculum/* of the last `next` and `observe` (the RL stage logs them with the step)."""
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.state_dict(), "history": self.history.state_dict(), "rng": self.rng.getstate(),
                "rescued": dict(self.rescued), "own": self.own_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state["history"])
        replaced = {variant: task_id for task_id, variant in state["rescued"].items()}
        self.bank.load_state_dict(state["bank"], lambda variant: self.variant(self.bank.tasks[replaced[variant]]))
        self.rng.setstate(state["rng"])
        self.rescued = dict(state["rescued"])
        self.load_own_state(state["own"])

    def own_state(self) -> dict[str, Any]:
        return {}

    def load_own_state(self, state: dict[str, Any]) -> None:
        pass


POOL_SIZE = Annotated[int, Field(ge=0, description="0: the environment's training stream; N: a fixed pool of its "
                                 "first N distinct tasks (a dataset of known size, so prompts recur)")]
RESCUE_AFTER = Annotated[int, Field(ge=0, description="Replace a prompt unsolved on this many visits by the "
                                    "environment's easier variant (env.easier); 0 = off")]


@SAMPLERS.register("pools")
class PoolsSampler(HistorySampler):
    """Prompts in four pools by their recent pass rate (mean of the last `window` visits): new (never seen), easy
    (>= easy_at), hard (<= hard_at), learnable (between). Each step draws from the pools by `ratios` (None:
    new 0.3, learnable 0.6, easy 0.05, hard 0.05); a pool short of prompts gives its share to the others. Prompts
    move between pools as their pass rate changes."""

    def __init__(self, env: Any, seed: int, *, pool_size: POOL_SIZE = 0, rescue_after: RESCUE_AFTER = 0,
                 window: Annotated[int, Field(gt=0)] = 2,
                 easy_at: Annotated[float, Field(ge=0, le=1)] = 1.0,
                 hard_at: Annotated[float, Field(ge=0, le=1)] = 0.0,
                 ratios: dict[str, float] | None = None) -> None:
        super().__init__(env, seed, pool_size=pool_size, rescue_after=rescue_after)
        self.window, self.easy_at, self.hard_at = window, easy_at, hard_at
        self.ratios = {"new": 0.3, "learnable": 0.6, "easy": 0.05, "hard": 0.05} if ratios is None else ratios
        if set(self.ratios) - {"new", "learnable", "easy", "hard"} or any(r < 0 for r in self.ratios.values()) \
                or not sum(self.ratios.values()):
            raise UserError(f"rl.sampler_args.ratios: keys among new, learnable, easy, hard, weights >= 0 and not "
                            f"all 0, got {self.ratios}")
        self.ratios = {k: self.ratios.get(k, 0.0) for k in ("new", "learnable", "easy", "hard")}

    def pools(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"learnable": [], "easy": [], "hard": []}
        for task_id in self.bank.tasks:
            if task_id in self.rescued or not self.visits(task_id):
                continue
            out[pool_of(self.visits(task_id), window=self.window, easy_at=self.easy_at,
                        hard_at=self.hard_at)].append(task_id)
        return out

    def pick(self, n: int) -> list[Task]:
        pools = self.pools()
        unseen = [i for i in self.bank.tasks if not self.visits(i) and i not in self.rescued]
        # "new" is the stream itself: as many as asked, bounded by n (the stream may still run dry)
        counts = split_counts(n, self.ratios, {"new": n, **{k: len(v) for k, v in pools.items()}})
        out = [self.bank.tasks[i] for i in unseen[: counts["new"]]]
        while len(out) < counts["new"] and (t := self.bank.fresh()) is not None:
            out.append(t)
        short = counts["new"] - len(out)
        for name in ("learnable", "easy", "hard"):
            out += [self.bank.tasks[i] for i in self.rng.sample(pools[name], counts[name])]
        if short:  # the stream ran dry: the rest from the seen pools in ratio order
            taken = {t.id for t in out}
            rest = [i for name in ("learnable", "easy", "hard") for i in pools[name] if i not in taken]
            out += [self.bank.tasks[i] for i in self.rng.sample(rest, min(short, len(rest)))]
        self._metrics.update({f"curriculum/pool_{k}": float(len(v)) for k, v in pools.items()})
        self._metrics.update({f"curriculum/drawn_{k}": float(v) for k, v in counts.items()})
        return out


@SAMPLERS.register("no_positive_resampling")
class NoPositiveResampling(HistorySampler):
    """Epochs over the tasks (the stream first, then known tasks in a fresh order each epoch), skipping every
    prompt whose last `window` visits each had pass rate >= `threshold`: it is retired, never sampled again."""

    def __init__(self, env: Any, seed: int, *, pool_size: POOL_SIZE = 0, rescue_after: RESCUE_AFTER = 0,
                 threshold: Annotated[float, Field(gt=0, le=1)] = 1.0,
                 window: Annotated[int, Field(gt=0)] = 1) -> None:
        super().__init__(env, seed, pool_size=pool_size, rescue_after=rescue_after)
        self.threshold, self.window = threshold, window
        self.order: list[str] = []  # the current epoch's remaining known tasks

    def retired(self, task_id: str) -> bool:
        return stayed_solved(self.visits(task_id), threshold=self.threshold, window=self.window)

    def pick(self, n: int) -> list[Task]:
        out: list[Task] = []
        while len(out) < n and (t := self.bank.fresh()) is not None:
            out.append(t)
        for _ in range(2):  # finish this epoch, then at most one new one
            while len(out) < n and self.order:
                task_id = self.order.pop()
                if not self.retired(task_id) and all(t.id != task_id for t in out):
                    out.append(self.bank.tasks[task_id])
            if len(out) < n:
                self.order = [i for i in self.bank.tasks if not self.retired(i) and i not in self.rescued]
                self.rng.shuffle(self.order)
        retired = sum(self.retired(i) for i in self.bank.tasks)
        self._metrics["curriculum/retired"] = float(retired)
        if not out:
            raise UserError(f"no_positive_resampling: all {retired} tasks are retired (pass rate >= "
                            f"{self.threshold} on their last {self.window} visits); nothing is left to train on")
        return out

    def own_state(self) -> dict[str, Any]:
        return {"order": list(self.order)}

    def load_own_state(self, state: dict[str, Any]) -> None:
        self.order = list(state["order"])


def prompt_features(task: Task, dim: int) -> dict[int, float]:
    """Sparse features of a prompt for PCL's value model: a bias, its difficulty and source, and hashed character
    1-3-grams of the question (counts scaled by 1/sqrt(length) so long prompts do not dominate)."""
    grams = Counter(task.question[i: i + k] for k in (1, 2, 3) for i in range(len(task.question) - k + 1))
    scale = 1 / max(1.0, len(task.question)) ** 0.5
    feats: dict[int, float] = {0: 1.0}
    for token, count in [*grams.items(), (f"\0difficulty={task.difficulty}", 1 / scale),
                         (f"\0source={task.meta.get('source', '')}", 1 / scale)]:
        i = 1 + int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "big") % (dim - 1)
        feats[i] = feats.get(i, 0.0) + count * scale
    return feats


@SAMPLERS.register("pcl")
class PCLSampler(HistorySampler):
    """Prompt curriculum learning: a value model (logistic regression on prompt_features, fitted online to each
    group's realised pass rate) predicts p(correct) for `candidates` x n prompts (fresh ones and known ones); the n
    whose prediction is nearest `target` train. Logs the prediction of the picked prompts against what they then
    scored (curriculum/pred_mean, realised_mean, pred_abs_err)."""

    def __init__(self, env: Any, seed: int, *, pool_size: POOL_SIZE = 0, rescue_after: RESCUE_AFTER = 0,
                 target: Annotated[float, Field(gt=0, lt=1)] = 0.5,
                 candidates: Annotated[int, Field(ge=1)] = 4,
                 known_frac: Annotated[float, Field(ge=0, le=1)] = 0.5,
                 lr: Annotated[float, Field(gt=0)] = 0.1,
                 l2: Annotated[float, Field(ge=0)] = 1e-4,
                 dim: Annotated[int, Field(ge=16)] = 512) -> None:
        super().__init__(env, seed, pool_size=pool_size, rescue_after=rescue_after)
        self.target, self.candidates, self.known_frac = target, candidates, known_frac
        self.lr, self.l2, self.dim = lr, l2, dim
        self.weights = [0.0] * dim
        self.predicted: dict[str, float] = {}  # the picked prompts' predictions, until their outcome is observed

    def predict(self, task: Task) -> float:
        return logistic_predict(self.weights, prompt_features(task, self.dim))

    def pick(self, n: int) -> list[Task]:
        known = [i for i in self.bank.tasks if i not in self.rescued and self.visits(i)]
        n_known = min(len(known), round(n * self.candidates * self.known_frac))
        pool = [self.bank.tasks[i] for i in self.rng.sample(known, n_known)]
        pool += self.fresh_or_known(n * self.candidates - len(pool), exclude={t.id for t in pool})
        predictions = [self.predict(t) for t in pool]
        picked = [pool[i] for i in nearest_to_target(predictions, self.target, n)]
        self.predicted = {t.id: self.predict(t) for t in picked}
        self._metrics["curriculum/pred_mean"] = sum(self.predicted.values()) / max(1, len(picked))
        return picked

    def observe(self, outcomes: Sequence[GroupOutcome], *, step: int) -> None:
        super().observe(outcomes, step=step)
        errors, realised = [], []
        for o in outcomes:
            p = logistic_update(self.weights, prompt_features(o.task, self.dim), o.pass_rate, lr=self.lr, l2=self.l2)
            errors.append(abs(self.predicted.pop(o.task.id, p) - o.pass_rate))
            realised.append(o.pass_rate)
        if outcomes:
            self._metrics.update({"curriculum/realised_mean": sum(realised) / len(realised),
                                  "curriculum/pred_abs_err": sum(errors) / len(errors)})

    def own_state(self) -> dict[str, Any]:
        return {"weights": list(self.weights), "predicted": dict(self.predicted)}

    def load_own_state(self, state: dict[str, Any]) -> None:
        self.weights, self.predicted = list(state["weights"]), dict(state["predicted"])


@SAMPLERS.register("dump")
class DUMPSampler(HistorySampler):
    """A UCB bandit over arms (the task's mixture source, or its difficulty): an arm's value is the mean |advantage|
    (mean |r - mean r|, algos/curriculum.py) of its last `window` groups; each prompt's arm is drawn from
    softmax(UCB / temperature), then the arm's next fresh task (or a known one of it once it has none). The arms
    are those among the first `lookahead` tasks of the stream, and any met later while looking for a task."""

    def __init__(self, env: Any, seed: int, *, pool_size: POOL_SIZE = 0, rescue_after: RESCUE_AFTER = 0,
                 arms: str = "difficulty",
                 c: Annotated[float, Field(ge=0)] = 0.5,
                 temperature: Annotated[float, Field(gt=0)] = 0.1,
                 window: Annotated[int, Field(gt=0)] = 64,
                 lookahead: Annotated[int, Field(gt=0)] = 256) -> None:
        super().__init__(env, seed, pool_size=pool_size, rescue_after=rescue_after)
        if arms not in ("difficulty", "source"):
            raise UserError(f"rl.sampler_args.arms: 'difficulty' or 'source', got {arms!r}")
        self.arms, self.c, self.temperature, self.window, self.lookahead = arms, c, temperature, window, lookahead
        self.values: dict[str, list[float]] = {}  # arm -> |advantage| of its recent groups, oldest first
        self.pulls: dict[str, int] = {}
        self.buffer: dict[str, list[str]] = {}  # arm -> fresh task ids drawn while looking for another arm

    def arm_of(self, task: Task) -> str:
        return str(task.meta.get("source", "")) if self.arms == "source" else str(task.difficulty)

    def fill(self) -> bool:
        """One fresh task into its arm's buffer; False when the stream is used up."""
        task = self.bank.fresh()
        if task is None:
            return False
        arm = self.arm_of(task)
        self.buffer.setdefault(arm, []).append(task.id)
        self.values.setdefault(arm, [])
        self.pulls.setdefault(arm, 0)
        return True

    def probabilities(self) -> dict[str, float]:
        names = sorted(self.values)
        means = [sum(self.values[a]) / len(self.values[a]) if self.values[a] else 0.0 for a in names]
        scores = ucb_scores(means, [self.pulls[a] for a in names], c=self.c)
        return dict(zip(names, softmax(scores, self.temperature), strict=True))

    def pick(self, n: int) -> list[Task]:
        if not self.values:  # the arms are those of the first `lookahead` tasks (all of them, for a pool that size)
            for _ in range(self.lookahead):
                if not self.fill():
                    break
        probs = self.probabilities()
        out: list[Task] = []
        for arm in self.rng.choices(list(probs), weights=list(probs.values()), k=n):
            for _ in range(self.lookahead):
                if self.buffer.get(arm) or not self.fill():
                    break
            if self.buffer.get(arm):
                out.append(self.bank.tasks[self.buffer[arm].pop(0)])
            else:  # nothing fresh in this arm: a known task of it, else any
                taken = {t.id for t in out}
                known = [i for i, t in self.bank.tasks.items() if self.arm_of(t) == arm and i not in taken
                         and i not in self.rescued] or [i for i in self.bank.tasks if i not in taken]
                if known:
                    out.append(self.bank.tasks[self.rng.choice(known)])
        self._metrics.update({f"curriculum/arm_prob/{a}": p for a, p in probs.items()})
        return out

    def observe(self, outcomes: Sequence[GroupOutcome], *, step: int) -> None:
        super().observe(outcomes, step=step)
        for o in outcomes:
            arm = self.arm_of(o.task)
            self.values.setdefault(arm, []).append(mean_abs_advantage(o.rewards))
            self.values[arm] = self.values[arm][-self.window:]
            self.pulls[arm] = self.pulls.get(arm, 0) + 1
        self._metrics.update({f"curriculum/arm_value/{a}": sum(v) / len(v) for a, v in self.values.items() if v})

    def own_state(self) -> dict[str, Any]:
        return {"values": {k: list(v) for k, v in self.values.items()}, "pulls": dict(self.pulls),
                "buffer": {k: list(v) for k, v in self.buffer.items()}}

    def load_own_state(self, state: dict[str, Any]) -> None:
        self.values = {k: list(v) for k, v in state["values"].items()}
        self.pulls, self.buffer = dict(state["pulls"]), {k: list(v) for k, v in state["buffer"].items()}
