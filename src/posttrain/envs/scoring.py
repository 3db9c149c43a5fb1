"""Score many completions so that one bad verifier call costs only its own sample.

    scores = score_many(env, tasks, completions, timeout_s=10, workers=2)   # RL rewards and evaluation
    errors = ScoreErrors.of(scores)                                           # counts by reason, for logging

Every failure becomes `Score(failure_reward, False, info={"error": reason, "detail": ...})` with reason one of
  exception   the verifier raised (detail: "TypeError: ...")
  timeout     the call ran past timeout_s
  bad_reward  the reward was NaN/inf, not a number, or the return was not a Score
  crash       a worker process died while scoring
  worker      a worker process could not load the environment (every sample of the batch gets this)
  bad_turn    a multi-turn step returned something that is not a well-formed Turn (`checked_turn`)

Isolation is chosen by the env's `isolation` attribute (see envs/base.py `Isolation`; "process" when the env does
not declare one), overridable per call:
  inline   (the built-ins) no threads, no processes: ~1 us of overhead per sample, so thousands of scores per
           second. The trade-off: Python cannot interrupt a running function, so an inline call that overruns is
           reported as a timeout only when it returns, and one that never returns blocks the caller. Only trusted
           pure-Python verifiers should be inline.
  thread   for verifiers that bound their own time in a subprocess (the code sandbox): `workers` run at once;
           the caller stops waiting at timeout_s and abandons (cannot kill) a thread that still runs.
  process  for third-party verifiers (reasoning-gym): persistent worker processes, reused across calls, killed
           and replaced on timeout. Nothing blocks past timeout_s (plus process start-up, which is not counted).
           Costs a pickle round trip per sample and needs a picklable env.
The three strategies and the process pool are envs/pool.py; this module says what a well-formed return is and
what stands in for a failed call. `shutdown_pool` (re-exported from there) kills the pool's workers.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from posttrain.envs.pool import (
    call_many,
    shutdown_pool,  # noqa: F401 - re-exported: the CLI, the runner and tests import it here
)
from posttrain.envs.pool import describe as _describe
from posttrain.errors import UserError
from posttrain.records import Score, Task


def failure(reason: str, detail: str = "", reward: float = 0.0) -> Score:
    return Score(reward, False, {"error": reason, "detail": detail[:500]})


def checked(result: Any, failure_reward: float = 0.0) -> Score:
    """The verifier's return as a well-formed Score (float reward, bool correct, dict info), or a `bad_reward`
    failure when it is not a Score or its reward is not a finite real number (an int is fine; 10**400 is not)."""
    if not isinstance(result, Score):
        return failure("bad_reward", f"score() returned {type(result).__name__}, not Score", failure_reward)
    r = result.reward
    try:
        ok = not isinstance(r, bool) and isinstance(r, int | float) and math.isfinite(float(r))
    except OverflowError:
        ok = False
    if not ok:
        return failure("bad_reward", f"reward {_short(r)} is not a finite number", failure_reward)
    info = result.info if isinstance(result.info, dict) else ({} if result.info is None else {"info": result.info})
    if type(r) is float and isinstance(result.correct, bool) and info is result.info:
        return result
    return Score(float(r), bool(result.correct), info)


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else f"<int of {len(str(value))} digits>"
    return text[:100]


def score_many(env: Any, tasks: Sequence[Task], completions: Sequence[str], *, timeout_s: float = 10.0,
               workers: int = 2, failure_reward: float = 0.0, isolation: str | None = None) -> list[Score]:
    """Score completions[i] against tasks[i]; failures cost only their own sample (see module docstring)."""
    if len(tasks) != len(completions):
        raise ValueError(f"score_many: {len(tasks)} tasks but {len(completions)} completions")
    return call_many(env, "score", list(zip(tasks, completions)), timeout_s=timeout_s, workers=workers,
                     isolation=isolation, check=lambda value: checked(value, failure_reward),
                     fail=lambda reason, detail: failure(reason, detail, failure_reward))


def reset_many(env: Any, tasks: Sequence[Task], *, timeout_s: float = 10.0, workers: int = 2,
               isolation: str | None = None) -> list[Any]:
    """A multi-turn environment's `reset(task)` for each episode, isolated like its steps: -> the episode's
    state, or a failure Score (reward 0, info["error"]) for a reset that raised, hung past timeout_s or crashed
    its worker."""
    return call_many(env, "reset", [(t,) for t in tasks], timeout_s=timeout_s, workers=workers,
                     isolation=isolation, check=lambda state: state, fail=failure)


def step_many(env: Any, tasks: Sequence[Task], states: Sequence[dict], actions: Sequence[str], *,
              timeout_s: float = 10.0, workers: int = 2, isolation: str | None = None,
              max_observation_chars: int | None = None) -> list[Any]:
    """A multi-turn environment's `step(task, state, action)` for each episode, isolated like its verifier:
    -> a Turn (envs/multiturn.py) per episode, or a failure Score (reward 0, info["error"]) for a step that
    raised, hung past timeout_s, crashed its worker or returned something that is not a well-formed Turn
    (`checked_turn`; max_observation_chars defaults to the environment's `episode_rules`)."""
    from posttrain.envs.multiturn import episode_rules  # here, like checked_turn's import

    name = str(getattr(env, "name", type(env).__name__))
    cap = max_observation_chars if max_observation_chars is not None else episode_rules(env).max_observation_chars
    return call_many(env, "step", list(zip(tasks, states, actions)), timeout_s=timeout_s, workers=workers,
                     isolation=isolation, check=lambda value: checked_turn(value, name, cap), fail=failure)


TURN_COUNTS = ("tool_calls", "tool_errors")  # info keys that episodes add up: non-negative ints


def checked_turn(result: Any, env_name: str = "?", max_observation_chars: int | None = None) -> Any:
    """The step's return as a well-formed Turn (a str or None observation of at most max_observation_chars, a
    finite reward, bool done and correct, a dict info whose TURN_COUNTS are non-negative ints), or a `bad_turn`
    failure naming the environment and the field."""
    from posttrain.envs.multiturn import MAX_OBSERVATION_CHARS, Turn

    def bad(detail: str) -> Score:
        return failure("bad_turn", f"environment {env_name!r}: step() {detail}")

    if not isinstance(result, Turn):
        return bad(f"returned {type(result).__name__}, not Turn")
    obs, cap = result.observation, max_observation_chars or MAX_OBSERVATION_CHARS
    if obs is not None and not isinstance(obs, str):
        return bad(f"returned an observation of type {type(obs).__name__}, not str or None")
    if obs is not None and len(obs) > cap:
        return bad(f"returned an observation of {len(obs):,} characters, over max_observation_chars = {cap:,}")
    r = result.reward
    try:  # a number (numpy's too): not a bool, not a numeric string
        ok = isinstance(r, numbers.Real) and not isinstance(r, bool) and math.isfinite(float(r))
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        return bad(f"returned turn reward {_short(r)}, not a finite number")
    info = {} if result.info is None else result.info
    if not isinstance(info, dict):
        return bad(f"returned info of type {type(info).__name__}, not dict")
    for key in TURN_COUNTS:
        n = info.get(key, 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return bad(f"returned info[{key!r}] = {_short(n)}, not a non-negative int")
    try:
        done, correct = bool(result.done), bool(result.correct)
    except Exception as e:  # noqa: BLE001 - an object whose truth value raises (a multi-element array)
        return bad(f"returned done/correct that are not booleans ({_describe(e)})")
    if done is result.done and correct is result.correct and info is result.info and type(r) is float:
        return result
    return replace(result, reward=float(r), done=done, correct=correct, info=info)


# ----- summaries for logging ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreErrors:
    """How many scores failed, by `info["error"]` reason; `metrics()` gives `score/...` columns."""

    total: int
    by_reason: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, scores: Sequence[Score]) -> ScoreErrors:
        reasons = Counter(str(s.info["error"]) for s in scores if "error" in s.info)
        return cls(total=len(scores), by_reason=dict(sorted(reasons.items())))

    @property
    def failed(self) -> int:
        return sum(self.by_reason.values())

    def metrics(self, prefix: str = "score") -> dict[str, float]:
        out = {f"{prefix}/error_frac": self.failed / self.total if self.total else 0.0}
        out.update({f"{prefix}/error/{reason}": float(n) for reason, n in self.by_reason.items()})
        return out

    def __str__(self) -> str:
        if not self.failed:
            return f"0/{self.total} failed"
        parts = ", ".join(f"{reason}={n}" for reason, n in self.by_reason.items())
        return f"{self.failed}/{self.total} failed ({parts})"


def info_means(scores: Sequence[Score], keys: Sequence[str]) -> dict[str, float]:
    """The mean of each numeric `info` field an environment declares as a metric (its `info_metrics` attribute:
    a custom reward's own diagnostics, e.g. the characters it penalised), logged as rollout/info/<key> and
    eval/info/<key>. The mean is over the scores that carry a number under the key (a verifier failure carries
    none); a key no score carries is left out."""
    out = {}
    for key in keys:
        values = [float(s.info[key]) for s in scores
                  if isinstance(s.info.get(key), int | float) and not isinstance(s.info.get(key), bool)]
        if values:
            out[key] = sum(values) / len(values)
    return out


# ----- the scorer a run uses ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scorer:
    """The environment's verifier with a run's limits: `scorer(tasks, texts) -> scores`.

    A failed verifier call costs only its own sample (failure_reward); more than `max_error_frac` of one call's
    completions failing stops the run (a UserError naming the first failure) rather than train on garbage.
    max_error_frac = None never stops (evaluation: its failures are counted and reported, and a handful of
    samples failing must not end a run). `failures(tasks, scores)` describes the failures of a call, for the log.
    """

    env: Any
    timeout_s: float = 10.0
    failure_reward: float = 0.0
    max_error_frac: float | None = 0.5
    score_fn: Callable[..., list[Score]] = score_many  # where verifiers run: here, or a Ray pool (dist/scoring.py)

    control: str = "verifier"  # env.reward: a REWARD_CONTROLS entry replacing the training reward
    control_args: dict[str, Any] = field(default_factory=dict)

    def __call__(self, tasks: Sequence[Task], texts: Sequence[str], *, seed: int = 0) -> list[Score]:
        """`seed` draws a random reward control's rewards (rollout/collect.py passes the step's sampling seed)."""
        scores = self.score_fn(self.env, tasks, texts, timeout_s=self.timeout_s, failure_reward=self.failure_reward)
        errors = ScoreErrors.of(scores)
        if self.max_error_frac is not None and errors.failed > self.max_error_frac * errors.total:
            raise UserError(f"{errors.failed} of {errors.total} completions could not be scored (more than "
                            f"env.max_error_frac = {self.max_error_frac}); first: {_first_failure(tasks, scores)}")
        return self.controlled(tasks, texts, scores, seed=seed)

    def controlled(self, tasks: Sequence[Task], texts: Sequence[str], scores: list[Score], *,
                   seed: int) -> list[Score]:
        """The control's rewards in place of the verifier's (scores unchanged without one); `correct` stays the
        verifier's, and its reward is kept in info["verifier_reward"]. Multi-turn episodes come here directly."""
        if self.control == "verifier":
            return scores
        import torch  # here: verifier worker processes import this module and need no torch

        from posttrain.algos.reward_controls import REWARD_CONTROLS, RewardControlInputs
        from posttrain.envs.base import answer_parses

        x = RewardControlInputs(torch.tensor([s.reward for s in scores], dtype=torch.float),
                                torch.tensor([s.correct for s in scores], dtype=torch.bool),
                                torch.tensor([answer_parses(self.env, t, c) for t, c in zip(tasks, texts, strict=True)],
                                             dtype=torch.bool))
        rewards = REWARD_CONTROLS.call(self.control, x, torch.Generator().manual_seed(seed), shape=(len(scores),),
                                       **self.control_args)  # a user's control is checked: (B,), finite
        return [Score(float(r), s.correct, {**s.info, "verifier_reward": s.reward})
                for r, s in zip(rewards.tolist(), scores, strict=True)]

    def verifier_only(self) -> Scorer:
        """This scorer without a reward control (evaluation measures the verifier, whatever training is fed)."""
        return replace(self, control="verifier", control_args={})

    def with_env(self, env: Any) -> Scorer:
        return replace(self, env=env)

    def never_stopping(self) -> Scorer:
        return replace(self, max_error_frac=None)

    @staticmethod
    def failures(tasks: Sequence[Task], scores: Sequence[Score]) -> str | None:
        """A line for the run log about the completions that could not be scored, or None if all were."""
        errors = ScoreErrors.of(scores)
        if not errors.failed:
            return None
        return f"{errors.failed}/{errors.total} completions could not be scored; e.g. {_first_failure(tasks, scores)}"


def _first_failure(tasks: Sequence[Task], scores: Sequence[Score]) -> str:
    task, s = next((t, s) for t, s in zip(tasks, scores) if "error" in s.info)
    return f"task {task.id!r}: {s.info.get('error')} {str(s.info.get('detail', ''))[:200]}"
