"""What a stage tells the people and tools watching the run: notes (printed above the progress bar and kept in
run.log), the phase being entered (heartbeat.json, the stall watchdog, the fault-injection point), the progress
bar and its status text. The metric log and samples.jsonl are written through the run context, which knows the
step and the totals."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from posttrain.runtime.state import RunState
from posttrain.tracking.heartbeat import Heartbeat

T = TypeVar("T")
PROGRESS_EVERY_S = 30.0  # how often a non-terminal log gets a progress line


class Services:
    """Notes, phases and progress of a run in `run_dir`; `state` says which step a note or phase belongs to."""

    def __init__(self, run_dir: Path, console: Console, state: RunState, *, stall_timeout_s: float = 900.0):
        self.run_dir, self.console, self.state = run_dir, console, state
        self._status = ""
        self._bar: Progress | None = None
        self.heartbeat = Heartbeat(run_dir, stall_timeout_s=stall_timeout_s, on_stall=self.note)

    def note(self, message: str) -> None:
        """A line for the human: printed above the progress bar and kept in run.log."""
        self.console.print(f"[dim]{escape(message)}[/dim]")
        with (self.run_dir / "run.log").open("a") as f:
            f.write(f"[step {self.state.global_step}] {message}\n")

    def phase(self, name: str, detail: str = "") -> None:
        """Announce the phase being entered (heartbeat.json, stall watchdog, fault-injection point)."""
        self.heartbeat.phase(name, detail, step=self.state.global_step)

    def status(self, text: str) -> None:
        """The progress bar's status text (e.g. the step's mean reward)."""
        self._status = text
        if self._bar is not None:
            self._bar.update(self._task, status=escape(text))

    def progress(self, items: Iterable[T], *, total: int, description: str, completed: int = 0) -> Iterator[T]:
        """A progress bar on a terminal; in a log (SLURM, `> file`) a plain line every PROGRESS_EVERY_S seconds.
        A stage that stops early (SFT's accuracy target) leaves the bar at the step it reached, not an ETA."""
        if not self.console.is_terminal:
            yield from self._progress_lines(items, total=total, description=description, completed=completed)
            return
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total, completed=completed, status="")
            self._bar, self._task = bar, task
            done = completed
            try:
                for item in items:
                    try:
                        yield item
                    except GeneratorExit:  # the stage broke out after finishing this item (an early stop)
                        done += 1
                        raise
                    bar.advance(task)
                    done += 1
            finally:
                if done < total:  # stopped early: the bar ends where the stage ended
                    bar.update(task, total=done, status=escape(f"{self._status} (stopped at {done}/{total})"))
                self._bar = None

    def _progress_lines(self, items: Iterable[T], *, total: int, description: str, completed: int) -> Iterator[T]:
        start, last, done = time.time(), time.time(), completed
        for item in items:
            yield item
            done += 1
            now = time.time()
            if now - last >= PROGRESS_EVERY_S or done == total:
                rate = (done - completed) / max(now - start, 1e-9)
                eta = (total - done) / rate if rate > 0 else float("nan")
                self.console.print(f"{description} {done}/{total} {self._status} elapsed {now - start:.0f} s, eta "
                                   f"{eta:.0f} s", markup=False, highlight=False)
                last = now
