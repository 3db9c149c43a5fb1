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
"""

from __future__ import annotations

import hashlib
import itertools
import math
import numbers
import pickle
import queue
import select
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from posttrain.envs._worker import READY, Worker, WorkerDied
from posttrain.errors import UserError
from posttrain.records import Score, Task
from posttrain.registry import load_user_file, user_files

ISOLATIONS = ("inline", "thread", "process")


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


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


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


def call_many(env: Any, method: str, calls: Sequence[tuple], *, timeout_s: float, workers: int,
              isolation: str | None, check: Callable[[Any], Any], fail: Callable[[str, str], Any]) -> list[Any]:
    """env.<method>(*calls[i]) for every i under the env's isolation; `check` vets a return, `fail(reason,
    detail)` stands in for a call that failed."""
    # An env that does not declare how trustworthy its verifier is gets worker processes: nothing it does can
    # block the run past timeout_s. Only the env's own class counts: a user subclass of a built-in does not
    # inherit the built-in's "inline" (its new score() is not the trusted one) unless it says so itself.
    mode = isolation or vars(type(env)).get("isolation") or getattr(env, "__dict__", {}).get("isolation") or "process"
    if mode not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {mode!r} (env {getattr(env, 'name', env)!r})")
    if workers < 1 or timeout_s <= 0:
        raise ValueError(f"{method} calls need workers >= 1 and timeout_s > 0, got {workers}, {timeout_s}")
    if not calls:
        return []
    if mode == "inline":
        return [_call_inline(getattr(env, method), args, timeout_s, check, fail) for args in calls]
    if mode == "thread":
        return _call_threads(getattr(env, method), calls, timeout_s, workers, check, fail)
    with _POOL_LOCK:  # one batch at a time owns the shared worker processes
        return _call_processes(env, method, calls, timeout_s, workers, check, fail)


def _call_inline(fn: Callable[..., Any], args: tuple, timeout_s: float, check, fail) -> Any:
    start = time.perf_counter()
    try:
        result = fn(*args)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a verifier bug (sys.exit too) costs its sample, not the run
        return fail("exception", _describe(e))
    elapsed = time.perf_counter() - start
    if elapsed > timeout_s:
        return fail("timeout", f"inline call took {elapsed:.2f}s > {timeout_s:g}s (it could not be interrupted; "
                    "give the env isolation='process')")
    return check(result)


def _call_threads(fn, calls, timeout_s, workers, check, fail) -> list[Any]:
    """One daemon thread per call, at most `workers` counted as running; a thread past its deadline stops
    being counted (it is abandoned, still running) so the rest of the batch proceeds."""
    results: list[Any] = [None] * len(calls)
    done: queue.Queue[tuple[int, Any, BaseException | None]] = queue.Queue()

    def run(i: int) -> None:
        try:
            done.put((i, fn(*calls[i]), None))
        except BaseException as e:  # noqa: BLE001
            done.put((i, None, e))

    todo, running = deque(range(len(calls))), {}  # running: index -> deadline
    while todo or running:
        while todo and len(running) < workers:
            i = todo.popleft()
            running[i] = time.monotonic() + timeout_s
            threading.Thread(target=run, args=(i,), daemon=True, name=f"call-{i}").start()
        try:
            i, result, err = done.get(timeout=max(0.0, min(running.values()) - time.monotonic()))
            if i in running:  # else it already timed out; its late answer is ignored
                del running[i]
                results[i] = fail("exception", _describe(err)) if err is not None else check(result)
        except queue.Empty:
            pass
        now = time.monotonic()
        for i in [i for i, deadline in running.items() if now >= deadline]:
            del running[i]
            results[i] = fail("timeout", f"no result within {timeout_s:g}s (thread abandoned)")
    return results


# ----- process isolation -------------------------------------------------------------------------------------

_POOL: list[Worker] = []
_POOL_LOCK = threading.Lock()
_POOL_TARGET = "posttrain.envs.scoring:_worker_handle"
_WORKER_ENVS: dict[str, Any] = {}  # inside a worker process: the env it holds, by key
_REQUEST_IDS = itertools.count()


def _worker_handle(msg: tuple) -> Any:
    """Runs inside a pool worker: ("env", key, pickled env, user files) loads an env; ("call", key, request id,
    method, args) calls env.<method>(*args), and the reply carries the request id, so a late reply can never be
    taken for another call's."""
    if msg[0] == "env":
        for module_key, path in msg[3].items():  # an env class from a user's file.py: load the file first
            load_user_file(module_key, Path(path))
        _WORKER_ENVS.clear()
        _WORKER_ENVS[msg[1]] = pickle.loads(msg[2])
        return None
    env = _WORKER_ENVS[msg[1]]
    return msg[2], getattr(env, msg[3])(*msg[4])


def _call_processes(env, method, calls, timeout_s, workers, check, fail_result) -> list[Any]:
    try:
        blob = pickle.dumps(env, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001 - any pickling failure is the same user-fixable problem
        raise UserError(f"environment {getattr(env, 'name', type(env).__name__)!r} is scored in worker processes "
                        f"(isolation = 'process', the default for environments that do not declare one) and "
                        f"cannot be pickled: {type(e).__name__}: {e}. Make it picklable, or declare "
                        "`isolation = 'thread'` (or 'inline' for a trusted, fast verifier) on its class") from None
    key = hashlib.sha1(blob).hexdigest()
    while len(_POOL) < workers:
        _POOL.append(Worker(_POOL_TARGET))
    pool = _POOL[:workers]
    results: list[Any] = [None] * len(calls)
    request_ids: dict[Worker, int] = {}
    todo: deque[int] = deque(range(len(calls)))
    busy: dict[Worker, tuple[Any, float]] = {}  # worker -> (sample index | "start" | "env", deadline)
    fatal: str | None = None  # the env cannot be loaded in a worker: fail every remaining sample

    def give_work(w: Worker) -> None:
        now = time.monotonic()
        if not w.alive:
            w.start()
            busy[w] = ("start", now + w.startup_timeout_s)
        elif w.state != key:
            w.send(("env", key, blob, user_files()))
            busy[w] = ("env", now + w.startup_timeout_s)
        else:
            i = todo.popleft()
            request_ids[w] = request_id = next(_REQUEST_IDS)
            w.send(("call", key, request_id, method, calls[i]))
            busy[w] = (i, now + timeout_s)

    def finish(w: Worker, job: Any, reply: Any) -> None:
        nonlocal fatal
        del busy[w]
        if job == "start":
            return
        ok = isinstance(reply, tuple) and reply[0] == "ok"
        if job == "env":
            if ok:
                w.state = key
            else:
                fatal = f"cannot load env in a worker: {reply[1]}: {reply[2]}"
        elif ok:
            request_id, value = reply[1]
            if request_id != request_ids.get(w):  # a reply to another call's request: not this sample's
                results[job] = fail_result("crash", "worker answered a stale request")
                w.kill()
                return
            results[job] = check(value)
        else:
            results[job] = fail_result("exception", f"{reply[1]}: {reply[2]}")

    def fail(w: Worker, job: Any, reason: str, detail: str) -> None:
        nonlocal fatal
        busy.pop(w, None)
        w.kill()
        if isinstance(job, int):
            results[job] = fail_result(reason, detail)
        else:
            fatal = f"worker {job} failed: {detail}"

    try:
        while fatal is None and (todo or busy):
            for w in pool:
                if w not in busy and todo:
                    try:
                        give_work(w)
                    except WorkerDied as e:
                        fail(w, "start", "worker", str(e))
            if not busy:
                continue
            wait = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
            readable = select.select([w.fileno() for w in busy], [], [], wait)[0]
            for w in [w for w in list(busy) if w.fileno() in readable]:
                job = busy[w][0]
                try:
                    reply = w.poll()
                except WorkerDied as e:
                    fail(w, job, "crash", f"worker died in {method}(): {e}")
                    continue
                if reply is not None and (job == "start") == (reply == READY):
                    finish(w, job, reply)
            now = time.monotonic()
            for w, (job, deadline) in list(busy.items()):
                if now >= deadline:
                    fail(w, job, "timeout", f"no result within {timeout_s:g}s (worker killed)" if isinstance(job, int)
                         else f"no {job} handshake within {w.startup_timeout_s:g}s")
    finally:  # an exception mid-batch leaves no worker holding a request a later call could read
        if fatal is None:
            for w in [w for w, (job, _) in busy.items() if isinstance(job, int)]:
                w.kill()
    if fatal is not None:
        for w in list(busy):
            w.kill()
        for i, r in enumerate(results):
            if r is None:
                results[i] = fail_result("worker", fatal)
    return results


def shutdown_pool() -> None:
    """Kill the process-isolation workers (they are also killed at interpreter exit)."""
    for w in _POOL:
        w.kill()
    _POOL.clear()


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
