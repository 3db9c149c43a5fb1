"""Heartbeat, stall watchdog and fault-injection points.

Every phase of a step announces itself with `Heartbeat.phase(name, detail)`: the run directory's heartbeat.json
then says what the run is doing and since when (readable from another shell), and a watchdog thread reports a
phase that has made no progress for `stall_timeout_s`, naming the phase and what it was waiting on.

`POSTTRAIN_FAULT=<phase>:<global step>` makes the process SIGKILL itself on entering that phase at that step.
It exists so the crash-resume tests can kill a run at an exact point (tests/e2e/test_crash_resume.py).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

FAULT_ENV = "POSTTRAIN_FAULT"


def fault_point(phase: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{phase}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class Heartbeat:
    def __init__(self, run_dir: Path, *, stall_timeout_s: float, on_stall: Callable[[str], None]):
        self.path = run_dir / "heartbeat.json"
        self.stall_timeout_s = stall_timeout_s
        self.on_stall = on_stall
        self.step = 0
        self._phase, self._detail, self._since = "start", "", time.time()
        self._reported = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="posttrain-watchdog", daemon=True)
        self._thread.start()

    def phase(self, name: str, detail: str = "", *, step: int | None = None) -> None:
        with self._lock:  # an asynchronous rollout producer and the learner announce phases from two threads
            if step is not None:
                self.step = step
            at = self.step  # this caller's step: the other thread may move self.step before the fault check
            self._phase, self._detail, self._since, self._reported = name, detail, time.time(), False
            self._write()
        fault_point(name, at)

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"phase": self._phase, "detail": self._detail, "step": self.step,
                                   "since": self._since, "pid": os.getpid(), "updated": time.time()}))
        tmp.replace(self.path)

    def _watch(self) -> None:
        interval = max(0.05, min(5.0, self.stall_timeout_s / 4))
        while not self._stop.wait(interval):
            with self._lock:
                stalled = time.time() - self._since
                if stalled < self.stall_timeout_s or self._reported:
                    continue
                self._reported = True
                message = (f"stalled: phase '{self._phase}' at step {self.step} has made no progress for "
                           f"{stalled:.0f} s" + (f" (waiting on: {self._detail})" if self._detail else ""))
            self.on_stall(message)

    def close(self) -> None:
        self._stop.set()
        self.phase("finished")
