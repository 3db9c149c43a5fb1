"""The loop every stage shares: its Learner and resume, the progress bar, the end of a step (the ledger of what
trained, the policy's version, the metric row, the scheduled evaluation, the checkpoint, a requested stop) and
the end of the stage (the final evaluation and checkpoint). A stage's file holds only its method:

    loop = StageLoop(ctx, c, resume, steps=c.steps)
    cursor = resume.state.cursor if resume else 0
    for step in loop.steps():
        result = loop.learner.train_step(...)              # the method
        loop.trained(result)                               # skipped-update notes, the train ledger, global_step += 1
        loop.end_step(metrics, Cursor(cursor), eval_every=c.eval_every)
    loop.end_stage(Cursor(cursor))                         # final evaluation, final checkpoint

A step helper returns what it measured (a `runtime/ledger.py` Measured: metrics, FLOPs by kind, counters, notes)
instead of writing into the run; `loop.account(measured)` counts it once and hands back its metrics.

`end_step` is `log` (the row, then the evaluation scheduled at this step) followed by `checkpoint` (when due, then
a requested stop ends the run); a stage that acts between the two (RL's reference reset) calls them apart. The
weights reach the rollout engine through `publish`, which every evaluation calls first and which does nothing
when the engine already holds this version; a stage that samples calls it after each update.

A stage's resumable state is a frozen `StageState` dataclass of plain data (a data cursor, a sampler's state,
reference weights), registered with the stage (`register_stage(name, Config, state=...)`): the runner reads it
back from the checkpoint into that class and hands it to the stage as `resume.state`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from posttrain.presets import PresetKeys
from posttrain.runtime.context import RunContext
from posttrain.runtime.ledger import Measured
from posttrain.stages import StageResume, StageState
from posttrain.train.learner import StepResult
from posttrain.train.protocol import LearnerLike


class StageLoop:
    """One stage's steps around its method (module docstring). `c`: the stage's section (its optimizer keys and
    `updates_per_step`); `steps`: the stage's step count; `on_saved(state, done)` runs after each checkpoint of the
    stage (RL writes prompts.jsonl there)."""

    def __init__(self, ctx: RunContext, c: Any, resume: StageResume | None, *, steps: int,
                 on_saved: Callable[[Any, bool], None] | None = None) -> None:
        self.ctx, self.name, self.total, self.on_saved = ctx, ctx.state.stage, steps, on_saved
        if isinstance(c, PresetKeys) and c.preset and c.preset_overrides and not resume:
            ctx.services.note(f"{self.name}.preset = {c.preset}, with the recipe overriding: "
                              f"{'; '.join(c.preset_overrides)}")
        self.learner: LearnerLike = ctx.learner(c, total_updates=steps * c.updates_per_step())
        self.start = self.stage_step = resume.stage_step if resume else 0
        if resume:
            self.learner.load_state_dict(resume.learner)

    def steps(self) -> Iterator[int]:
        """The stage's steps still to run (0-based), under a progress bar; `stage_step` is the running one's
        number (1-based), and after the loop the steps done (fewer than `steps` when the stage breaks out)."""
        bar = self.ctx.services.progress(range(self.start, self.total), total=self.total, completed=self.start,
                                description=self.name)
        try:
            for step in bar:
                self.stage_step = step + 1
                self.ctx.services.phase("step", f"{self.name} step {self.stage_step}")  # every stage's fault point
                yield step
        finally:
            bar.close()  # a stage that breaks out leaves the bar at the step it reached

    def trained(self, *results: StepResult) -> None:
        """The step's optimizer updates are done (none: nothing trained): note the skipped ones, count their work
        and tokens, and advance the policy's version (the run's global step)."""
        self.account(Measured(notes=[r.skipped + "; update skipped" for r in results if r.skipped]))
        if results:
            self.account(Measured(flops={"train": sum(r.flops for r in results)},
                                  counters={"train/tokens_total": sum(r.tokens for r in results)}))
        self.ctx.state.global_step += 1

    def account(self, measured: Measured) -> dict[str, Any]:
        """What a part of the step measured, counted once: its notes to run.log, its work and counters to the
        ledger -> its metrics, for the step's row."""
        for note in measured.notes:
            self.ctx.services.note(note)
        self.ctx.ledger.add_flops(self.name, **measured.flops)
        self.ctx.ledger.add(**measured.counters)
        return measured.metrics

    def publish(self) -> None:
        """The learner's weights to the rollout engine, unless it already samples from this version."""
        engine, version = self.ctx.parts.engine, self.ctx.state.global_step
        if engine.version != version:
            engine.update_weights(self.learner.weights(), version)

    def evaluate(self, tag: str, **how: Any) -> dict[str, Any]:
        """ctx.evaluate on the current weights (published first); `how`: greedy_only, log."""
        self.publish()
        return self.ctx.evaluate(tag, stage=self.name, **how)

    def scheduled(self, every: int) -> bool:
        """Whether something done every `every` steps (0: never) falls on this step; never on the stage's last
        step, where end_stage evaluates."""
        return every > 0 and self.stage_step % every == 0 and self.stage_step < self.total

    def log(self, metrics: dict[str, Any], *, eval_every: int = 0) -> dict[str, Any] | None:
        """Write the step's metric row, then the evaluation scheduled at this step, if any -> its result."""
        self.ctx.write_metrics(self.name, metrics)
        return self.evaluate(f"{self.name}-step{self.stage_step}") if self.scheduled(eval_every) else None

    def checkpoint(self, state: StageState) -> None:
        """The checkpoint scheduled at this step (or a requested stop's), then the stop, if one was requested."""
        if self.ctx.due(self.stage_step) and self.stage_step < self.total:
            self._save(state, done=False)
            self.ctx.stop_if_requested()

    def end_step(self, metrics: dict[str, Any], state: StageState, *, eval_every: int = 0) -> None:
        self.log(metrics, eval_every=eval_every)
        self.checkpoint(state)

    def end_stage(self, state: StageState) -> dict[str, Any]:
        """The stage's final evaluation (tag = the stage's name) and its final checkpoint -> the evaluation."""
        result = self.evaluate(self.name)
        self._save(state, done=True)
        return result

    def _save(self, state: StageState, *, done: bool) -> None:
        self.ctx.checkpoint(stage_step=self.stage_step, stage_done=done, learner=self.learner.state_dict(),
                            stage_state=state.to_dict())
        if self.on_saved is not None:
            self.on_saved(state, done)
