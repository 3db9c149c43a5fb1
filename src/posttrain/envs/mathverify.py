"""Math answer checking with math-verify (`\\boxed{1/2}` matches `0.5`), behind a hard timeout.

math-verify (sympy underneath) can hang on adversarial input and its own timeouts rely on SIGALRM, which only
works in the main thread. So the check runs in a persistent worker process (envs/_worker.py): a call that
overruns `timeout_s` kills the worker (a fresh one starts on the next call) and scores 0 with
info["error"] = "timeout". Start-up (importing math-verify, ~0.5 s) is not counted against the timeout.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from typing import Any

from posttrain.envs._worker import Worker, WorkerDied
from posttrain.errors import MissingExtraError
from posttrain.records import Score

MAX_COMPLETION_CHARS = 4000  # math-verify reads the end of the completion (last \boxed, last number)


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> Any:
    from math_verify import parse

    for text in (answer, f"${answer}$", f"\\boxed{{{answer}}}"):
        gold = parse(text)
        if gold:
            return gold
    raise ValueError(f"math-verify cannot parse the gold answer {answer!r}")


def _handle(msg: tuple[str, str]) -> tuple[bool, str]:
    """Runs in the worker: (gold answer, completion) -> (verified, what was extracted from the completion)."""
    from math_verify import parse, verify

    gold, completion = msg
    pred = parse(completion[-MAX_COMPLETION_CHARS:])
    return bool(verify(_parse_gold(gold), pred)), str(pred[-1] if pred else "")[:80]


class MathVerifier:
    """`verify(gold, completion) -> Score` through math-verify in a killable worker. Thread-safe (one worker,
    calls serialised). `target` exists so tests can substitute a verifier that hangs."""

    def __init__(self, timeout_s: float = 5.0, target: str = "posttrain.envs.mathverify:_handle"):
        if target.startswith("posttrain.") and importlib.util.find_spec("math_verify") is None:
            raise MissingExtraError("math-verify", "envs")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = timeout_s
        self.target = target
        self._worker = Worker(target)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # picklable (for process isolation): the worker is not shipped
        return {"timeout_s": self.timeout_s, "target": self.target}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def verify(self, gold: str, completion: str) -> Score:
        with self._lock:
            try:
                self._worker.ensure_ready()
            except (TimeoutError, WorkerDied) as e:
                return Score(0.0, False, {"error": "worker", "detail": f"math-verify worker did not start: {e}"})
            try:
                reply = self._worker.call((gold, completion), self.timeout_s)
            except TimeoutError:
                return Score(0.0, False, {"error": "timeout", "detail": f"math-verify took > {self.timeout_s:g}s"})
            except WorkerDied as e:
                return Score(0.0, False, {"error": "crash", "detail": str(e)})
        if reply[0] != "ok":
            return Score(0.0, False, {"error": "exception", "detail": f"{reply[1]}: {reply[2]}"[:300]})
        ok, extracted = reply[1]
        return Score(1.0 if ok else 0.0, ok, {} if ok else {"got": extracted})

    def close(self) -> None:
        self._worker.kill()
