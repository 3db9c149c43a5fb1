"""Where an environment's calls run: the three execution strategies behind `isolation` (envs/base.py `Isolation`).

    results = call_many(env, "score", [(task, text), ...], timeout_s=10, workers=2, isolation=None,
                        check=vet_a_return, fail=lambda reason, detail: stand_in)

  inline   in the caller, one after another; an overrun is reported when the call returns (it cannot be
           interrupted)
  thread   daemon threads, `workers` counted as running; one past its deadline is abandoned, still running
  process  a WorkerPool: persistent worker processes (envs/_worker.py) that hold the unpickled env, reused across
           calls, killed and replaced on timeout or crash

envs/scoring.py turns these into scores (score_many, reset_many, step_many): what counts as a well-formed return
(`check`) and what stands in for a failed call (`fail`) are its business, not this module's.
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from posttrain.envs._worker import READY, Worker, WorkerDied
from posttrain.errors import UserError
from posttrain.registry import load_user_file, user_files

ISOLATIONS = ("inline", "thread", "process")


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


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
    return POOL.call(env, method, calls, timeout_s=timeout_s, workers=workers, check=check, fail=fail)


def _call_inline(fn: Callable[..., Any], args: tuple, timeout_s: float, check, fail) -> Any:
    start = time.perf_counter()
    try:
        result = fn(*args)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a verifier bug (sys.exit too) costs its sample, not the run
        return fail("exception", describe(e))
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
                results[i] = fail("exception", describe(err)) if err is not None else check(result)
        except queue.Empty:
            pass
        now = time.monotonic()
        for i in [i for i, deadline in running.items() if now >= deadline]:
            del running[i]
            results[i] = fail("timeout", f"no result within {timeout_s:g}s (thread abandoned)")
    return results


# ----- process isolation -------------------------------------------------------------------------------------

_WORKER_TARGET = "posttrain.envs.pool:_worker_handle"
_WORKER_ENVS: dict[str, Any] = {}  # inside a worker process: the env it holds, by key


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


class WorkerPool:
    """Persistent worker processes, started on first need and reused across calls (and environments: a worker
    loads the env a batch needs when it holds another). One batch at a time owns them (`lock`)."""

    def __init__(self, target: str = _WORKER_TARGET) -> None:
        self.target = target
        self.workers: list[Worker] = []
        self.lock = threading.Lock()
        self._request_ids = itertools.count()

    def call(self, env: Any, method: str, calls: Sequence[tuple], *, timeout_s: float, workers: int,
             check: Callable[[Any], Any], fail: Callable[[str, str], Any]) -> list[Any]:
        """call_many's process strategy: the calls spread over the first `workers` workers."""
        with self.lock:
            return self._call(env, method, calls, timeout_s, workers, check, fail)

    def shutdown(self) -> None:
        """Kill the workers (they are also killed at interpreter exit)."""
        for w in self.workers:
            w.kill()
        self.workers.clear()

    def _call(self, env, method, calls, timeout_s, workers, check, fail_result) -> list[Any]:
        try:
            blob = pickle.dumps(env, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - any pickling failure is the same user-fixable problem
            raise UserError(f"environment {getattr(env, 'name', type(env).__name__)!r} is scored in worker "
                            f"processes (isolation = 'process', the default for environments that do not declare "
                            f"one) and cannot be pickled: {type(e).__name__}: {e}. Make it picklable, or declare "
                            "`isolation = 'thread'` (or 'inline' for a trusted, fast verifier) on its class") from None
        key = hashlib.sha1(blob).hexdigest()
        while len(self.workers) < workers:
            self.workers.append(Worker(self.target))
        pool = self.workers[:workers]
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
                request_ids[w] = request_id = next(self._request_ids)
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
                        fail(w, job, "timeout", f"no result within {timeout_s:g}s (worker killed)"
                             if isinstance(job, int) else f"no {job} handshake within {w.startup_timeout_s:g}s")
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


POOL = WorkerPool()  # the process's one pool: every process-isolated call shares its workers


def shutdown_pool() -> None:
    """Kill the process-isolation workers (they are also killed at interpreter exit)."""
    POOL.shutdown()
