"""What every stage of a run shares: the policy, the environment, the run directory, the metric log, the step
counter, checkpointing and evaluation. Stages (sft.py, rl.py) are plain functions that receive it."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from posttrain.config import RunConfig
from posttrain.data.prompts import context_length
from posttrain.envs.scoring import score_many
from posttrain.errors import UserError
from posttrain.evals.evaluate import evaluate, headline_metrics, write_eval
from posttrain.records import Score, Task
from posttrain.rollout.hf import HFEngine
from posttrain.tracking.heartbeat import Heartbeat
from posttrain.tracking.metrics import MetricsLog
from posttrain.train.checkpoint import rng_state, rotate, save_checkpoint

T = TypeVar("T")


@dataclass
class RunContext:
    cfg: RunConfig
    run_dir: Path
    model: Any
    tokenizer: Any
    env: Any
    log: MetricsLog
    console: Console
    global_step: int = 0
    started: float = field(default_factory=time.time)
    elapsed_offset: float = 0.0  # seconds spent before a resume
    totals: dict[str, float] = field(default_factory=dict)  # cumulative counters (tokens, flops, ...)
    evals: dict[str, dict] = field(default_factory=dict)
    stage: str = "base"  # the stage running now; compute is also counted per stage (compute/<stage>_flops)

    def __post_init__(self) -> None:
        self.engine = HFEngine(self.model, self.tokenizer, bf16=self.cfg.model.bf16)
        # What the training passes call: the same parameters, compiled on request (generation and checkpoints keep
        # using the plain module, whose state_dict has no compile-wrapper prefixes).
        self.learner = torch.compile(self.model, dynamic=True) if self.cfg.model.compile else self.model
        self.max_len = context_length(self.model)
        self.heartbeat = Heartbeat(self.run_dir, stall_timeout_s=self.cfg.stall_timeout_s, on_stall=self.note)

    def training_env(self, env_args: dict) -> Any:
        """The environment a stage trains on: [env] with the stage's env_args overrides (evaluation keeps [env])."""
        if not env_args:
            return self.env
        from posttrain.envs import make_env

        return make_env(self.cfg.env.name, {**self.cfg.env.args, **env_args})

    def phase(self, name: str, detail: str = "") -> None:
        """Announce the phase being entered (heartbeat.json, stall watchdog, fault-injection point)."""
        self.heartbeat.phase(name, detail, step=self.global_step)

    def score(self, tasks: list[Task], texts: list[str], env: Any = None) -> list[Score]:
        """Score with the environment's verifier, isolated: a failing verifier costs only its sample. Too many
        failures in one call stop the run rather than train on garbage."""
        e, env = self.cfg.env, env or self.env
        self.phase("score", f"verifier of {env.name} on {len(texts)} completions")
        scores = score_many(env, tasks, texts, timeout_s=e.score_timeout_s, failure_reward=e.failure_reward)
        failed = [(t, s) for t, s in zip(tasks, scores) if "error" in s.info]
        if failed:
            task, s = failed[0]
            self.note(f"{len(failed)}/{len(scores)} completions could not be scored; e.g. task {task.id!r}: "
                      f"{s.info.get('error')} {str(s.info.get('detail', ''))[:200]}")
            if len(failed) > e.max_error_frac * len(scores):
                raise UserError(f"{len(failed)} of {len(scores)} completions could not be scored (more than "
                                f"env.max_error_frac = {e.max_error_frac}); first: task {task.id!r}: "
                                f"{s.info.get('error')} {str(s.info.get('detail', ''))[:200]}")
        return scores

    # -- time and metrics ---------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_offset + time.time() - self.started

    def add(self, **counters: float) -> None:
        for k, v in counters.items():
            self.totals[k] = self.totals.get(k, 0.0) + v
            if k == "compute/flops":  # the x-axis of a stage's own scaling curve, e.g. compute/rl_flops
                key = f"compute/{self.stage}_flops"
                self.totals[key] = self.totals.get(key, 0.0) + v

    def write_metrics(self, stage: str, metrics: dict[str, Any]) -> None:
        row = {"step": self.global_step, "stage": stage, "time/elapsed_s": round(self.elapsed(), 3)}
        row.update(self.totals)
        row.update(metrics)
        self.log.log(row)

    def note(self, message: str) -> None:
        """A line for the human: printed above the progress bar and kept in run.log."""
        self.console.print(f"[dim]{message}[/dim]")
        with (self.run_dir / "run.log").open("a") as f:
            f.write(f"[step {self.global_step}] {message}\n")

    def progress(self, items: Iterable[T], *, total: int, description: str, completed: int = 0) -> Iterator[T]:
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total, completed=completed, status="")
            self._bar, self._task = bar, task
            for item in items:
                yield item
                bar.advance(task)
            self._bar = None

    def status(self, text: str) -> None:
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.update(self._task, status=text)

    def optimizer_step(self, params, optimizer, scheduler, guard, *, loss: float, grad_clip: float,
                       where: str) -> float:
        """Clip, then step unless the loss or gradient is non-finite (the guard logs, skips, or stops the run);
        advance the schedule either way. -> the pre-clip gradient norm."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        self.phase("optimizer_step")
        problem = guard.check(self.model, loss=loss, grad_norm=grad_norm, where=where)
        if problem is None:
            optimizer.step()
        else:
            self.note(problem + "; update skipped")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # -- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint(self, *, stage_index: int, stage_step: int, stage_done: bool, optimizer, scheduler,
                   cursor: int, extra: dict[str, Any] | None = None) -> Path:
        state = {
            "global_step": self.global_step, "stage_index": stage_index, "stage_step": stage_step,
            "stage_done": stage_done, "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None, "cursor": cursor, "rng": rng_state(),
            "totals": dict(self.totals), "elapsed_s": self.elapsed(), "evals": self.evals,
            "metrics_offset": self.log.offset(), "extra": extra or {},
        }
        self.phase("checkpoint", f"writing step_{self.global_step}")
        path = save_checkpoint(self.run_dir / "checkpoints", self.global_step, self.model, self.tokenizer, state)
        rotate(self.run_dir / "checkpoints", self.cfg.checkpoint.keep_last_n)
        return path

    def due(self, stage_step: int) -> bool:
        every = self.cfg.checkpoint.every
        return every > 0 and stage_step % every == 0

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, tag: str, *, stage: str, greedy_only: bool = False, log: bool = True) -> dict[str, Any]:
        e = self.cfg.eval
        t0 = time.time()
        self.phase("eval", f"{e.problems} problems x {e.samples} samples")
        result = evaluate(self.engine, self.tokenizer, self.env, problems=e.problems, samples=e.samples, ks=e.ks,
                          temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
                          seed=self.cfg.seed, chat_template=self.cfg.model.chat_template, max_len=self.max_len,
                          greedy_only=greedy_only, score=self.score)
        result.update({"tag": tag, "step": self.global_step, "stage": stage})
        if not greedy_only:
            write_eval(self.run_dir / "eval" / f"{tag}.json", result)
            self.evals[tag] = {k: v for k, v in headline_metrics(result).items()}
        if log:
            self.write_metrics(stage, {**headline_metrics(result), "time/eval_s": time.time() - t0})
        return result
