"""Run a recipe: prepare the run directory, resume from the newest complete checkpoint, build the run's context
(compose.py: policy, tokenizer, environment, rollout engine, scorer, evaluator), run the stages in order through
the stage registry (posttrain/stages.py), save the final model and a summary.

Resume is automatic: running the same recipe again continues from its newest complete checkpoint (or prints the
summary if the run finished). A run directory holding a different config is an error unless --fresh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import torch
from rich.console import Console

from posttrain import rundir
from posttrain.compose import build_context, intra_op_threads, start_notes, teacher_tokenizer
from posttrain.config import RunConfig, to_toml
from posttrain.envs import make_env
from posttrain.envs.scoring import shutdown_pool
from posttrain.errors import RunStopped, Terminated, UserError
from posttrain.models import load_tokenizer, resolve_model_path
from posttrain.models.lora import is_lora, merged_copy
from posttrain.registry import Registry
from posttrain.runtime.context import RunContext
from posttrain.runtime.parts import RunParts
from posttrain.stages import Stage, StageResume, StageState, load_stages
from posttrain.tracking.metrics import memory_mb, truncate_metrics
from posttrain.train.checkpoint import (
    STATE_FILE,
    TrainerState,
    latest_checkpoint,
    load_state,
    save_model_dir,
    set_rng_state,
)


def run(cfg: RunConfig, *, fresh: bool = False, console: Console | None = None,
        stop: StopOnSigterm | None = None) -> dict[str, Any]:
    """Run (or resume) a recipe; -> its summary. SIGTERM from the start on stops it at a step boundary
    (errors.RunStopped); a sweep passes its own `stop`, installed for all its points."""
    console = console or Console(stderr=True)
    with rundir.owned(cfg.run_dir):  # one writer per run directory; a second gets one line naming the owner
        if stop is not None:
            return _run(cfg, fresh=fresh, console=console, stop=stop)
        with StopOnSigterm() as own:
            return _run(cfg, fresh=fresh, console=console, stop=own)


def _run(cfg: RunConfig, *, fresh: bool, console: Console, stop: StopOnSigterm) -> dict[str, Any]:
    config = cfg.model_dump(mode="json")
    summary = None if fresh else rundir.finished_summary(cfg.run_dir, config)
    if summary is not None:
        console.print(f"{cfg.run_dir} already finished; showing its summary (use --fresh to run again)")
        return summary
    if fresh or not rundir.has_resumable_step(cfg.run_dir):
        # What can fail at start is checked before the run directory is touched.
        tokenizer_dir = resolve_model_path(cfg.model.path, cfg.seed)
        student_tokenizer = load_tokenizer(tokenizer_dir, require_chat_template=cfg.model.chat_template)
        if cfg.uses_teacher():
            teacher_tokenizer(cfg, student_tokenizer)
        make_env(cfg.env.name, cfg.env.args)
    run_dir, prepared = rundir.prepare(cfg.run_dir, config, to_toml(cfg), fresh=fresh)
    torch.set_num_threads(intra_op_threads(cfg.threads))
    torch.manual_seed(cfg.seed)
    stages = load_stages()

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    state = load_state(ckpt, stages=len(cfg.recipe)) if ckpt else None
    truncate_metrics(run_dir, state.metrics_offset if state else 0)
    ctx = build_context(cfg, run_dir, ckpt=ckpt, state=state, console=console)
    start_notes(ctx, cfg, prepared)
    stop.attach(ctx)
    try:
        if state:
            console.print(f"resuming {run_dir} from {ckpt.name} (stage {cfg.recipe[state.stage_index]})")
        else:
            _stop_before_training(ctx)  # a SIGTERM while the run was starting
            if cfg.eval.at_start:
                with stop.abandoning():  # nothing to checkpoint yet: a SIGTERM abandons the evaluation at once
                    ctx.evaluate("base", stage="base")
                _stop_before_training(ctx)
        run_stages(ctx, cfg, stages, state, ckpt)
        final = export_final(ctx.parts)
        summary = {"run_dir": str(run_dir), "steps": ctx.state.global_step, "elapsed_s": round(ctx.state.elapsed(), 1),
                   "evals": ctx.state.evals, "final_model": str(final),
                   "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "precision": "bf16" if ctx.parts.bf16 else "fp32",
                   **rundir.cpu_kind(), "peak_rss_mb": memory_mb()["perf/peak_rss_mb"]}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        (run_dir / rundir.DONE).write_text("")
        return summary
    finally:
        stop.attach(None)
        ctx.close()
        ctx.parts.engine.close()
        shutdown_pool()


def run_stages(ctx: RunContext, cfg: RunConfig, stages: Registry, state: TrainerState | None,
               ckpt: Path | None) -> None:
    """The recipe's stages in order, through the stage registry; on resume from the checkpoint `ckpt` (trainer
    state `state`), the finished ones are skipped and the interrupted one continues from its saved state."""
    for i, name in enumerate(cfg.recipe):
        if state and (i < state.stage_index or (i == state.stage_index and state.stage_done)):
            continue
        ctx.stop_if_requested()
        stage, resume = stages.get(name), None
        if state and state.stage_index == i:
            set_rng_state(state.rng)
            resume = StageResume(stage_step=state.stage_step, learner=state.learner,
                                 state=_stage_state(stage, state.stage, ckpt))
        ctx.state.stage, ctx.state.stage_index = name, i
        rundir.record_stage(ctx.parts.run_dir, name, resumed=resume is not None)
        stage.run(ctx, cfg.section(name), resume)
        state = None


def export_final(parts: RunParts) -> Path:
    """final/: the trained policy as a plain model every tool loads (a LoRA policy merged, its adapter beside it
    in final/adapter/), written beside and renamed into place, so a crash never leaves half a final model."""
    final, tmp = parts.run_dir / "final", parts.run_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    if is_lora(parts.policy):
        save_model_dir(tmp, merged_copy(parts.policy), parts.tokenizer)
        save_model_dir(tmp / "adapter", parts.policy, parts.tokenizer)
    else:
        save_model_dir(tmp, parts.policy, parts.tokenizer)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _stage_state(stage: Stage, saved: dict[str, Any], ckpt: Path) -> StageState:
    """A checkpoint's `stage` table read back into the stage's state class; a table that does not fit it (a
    hand-edited checkpoint, another version's) is one line naming the file."""
    try:
        return stage.state.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise UserError(f"{ckpt / STATE_FILE}: stage: not the state of stage {stage.name!r}: {e}") from None


class StopOnSigterm:
    """SIGTERM (timeout, a SLURM preemption) asks the run to stop at the end of the current step, after writing a
    checkpoint; one that comes while the run is starting stops it before its first step (after the start-of-run
    evaluation if that is under way). A second SIGTERM ends the process at once. A context manager that installs
    the handler (a no-op off the main thread); a sweep holds one over all its points, so a SIGTERM between two
    points starts no new one."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.ctx: RunContext | None = None
        self.previous: Any = None
        self.installed = self.abandon = False

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self.previous, self.installed = signal.signal(signal.SIGTERM, self._handle), True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)

    def attach(self, ctx: RunContext | None) -> None:
        """The run whose stages see the request (ctx.state.stop_requested), from now on and any made already."""
        self.ctx = ctx
        if ctx is not None:
            ctx.state.stop_requested = self.requested

    @contextmanager
    def abandoning(self) -> Iterator[None]:
        """Within: SIGTERM also stops the work under way at once (errors.Terminated, caught here), for work with
        nothing to checkpoint such as the start-of-run evaluation; the caller then acts on the request."""
        self.abandon = True
        try:
            yield
        except Terminated:
            pass  # self.requested (and ctx.stop_requested) say so
        finally:
            self.abandon = False

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        # Only flags: writing the log here could re-enter a write the main thread is in the middle of.
        self.requested = "SIGTERM"
        if self.ctx is not None:
            self.ctx.state.stop_requested = self.requested
        if self.abandon:
            raise Terminated


def _stop_before_training(ctx: RunContext) -> None:
    """A stop requested before the first step: there is no checkpoint to write, so a re-run starts over."""
    if ctx.state.stop_requested is not None:
        message = (f"stopped by {ctx.state.stop_requested} before the first training step (no checkpoint yet): re-run "
                   "the same command to start it again")
        ctx.services.note(message)
        raise RunStopped(message)
