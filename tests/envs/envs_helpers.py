"""Toy environments and worker targets for the env tests (importable by worker processes via sys.path)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sized
from pathlib import Path

from posttrain.records import Message, Score, Task


def make_tasks(n: int) -> list[Task]:
    return [Task(id=str(i), question=f"q{i}", answer=str(i), solution=str(i)) for i in range(n)]


class Echo:
    """Echo: answer the number in the question (a toy env for registry tests)."""

    name = "echo"

    def __init__(self, n: int = 3):
        self.n = n

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        return iter(make_tasks(self.n))

    def prompt(self, task: Task) -> list[Message]:
        return [{"role": "user", "content": task.question}]

    def score(self, task: Task, completion: str) -> Score:
        ok = completion.strip() == task.answer
        return Score(float(ok), ok)


class Faulty(Echo):
    """Misbehaves on chosen completions: "raise", "hang", "nan", "inf", "str", "none", "die"."""

    def __init__(self, isolation: str = "process", sleep_s: float = 60.0):
        super().__init__()
        self.isolation = isolation
        self.sleep_s = sleep_s

    def score(self, task: Task, completion: str) -> Score:
        if completion == "raise":
            raise ZeroDivisionError("verifier bug on purpose")
        if completion == "hang":
            time.sleep(self.sleep_s)
        if completion == "nan":
            return Score(float("nan"), True)
        if completion == "inf":
            return Score(float("inf"), True)
        if completion == "str":
            return Score("1.0", True)  # type: ignore[arg-type]
        if completion == "none":
            return None  # type: ignore[return-value]
        if completion == "die":
            os._exit(3)
        return super().score(task, completion)


def hang(msg: object) -> None:
    """A worker target that never answers (stands in for math-verify hanging on adversarial input)."""
    time.sleep(3600)


def fast(msg: object) -> tuple[bool, str]:
    return True, "fast"


def runner_processes() -> list[str]:
    """Processes still running the sandbox's runner script (none may outlive a scoring call). Under pytest-xdist
    another worker may be scoring at the same moment: runners descended from another worker are its own, not
    this test's; a runner that escaped its scoring call (orphaned, or reparented to init) still counts."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"def _main():" in cmd and b"report_fd" in cmd and not _descends_from_another_worker(int(d.name)):
                out.append(d.name)
    return out


def _parent(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 0)


def _descends_from_another_worker(pid: int) -> bool:
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return False
    controller, me = os.getppid(), os.getpid()
    while pid > 1:
        parent = _parent(pid)
        if parent == controller:  # pid is a child of xdist's controller: a worker
            return pid != me
        pid = parent
    return False


def settled(look: Callable[[], Sized], *, within_s: float = 60.0) -> Sized:
    """What `look` finds once it finds nothing, or at the deadline: leftovers of a concurrent test's call (another
    xdist worker's) go when that call ends; a leak stays."""
    deadline = time.monotonic() + within_s
    while (found := look()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found
