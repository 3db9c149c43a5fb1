"""What every stage of a run shares: the policy and its sampler, the environment, and the run's services (metric
log, notes, heartbeat, progress, checkpoints, evaluation, the compute ledger's totals).

The runner (runner.py) builds every part from the config and hands the stages plain values: nothing here reads
the recipe. The context holds no optimizer: each stage builds its own Learner (train/learner.py), through
`ctx.learner`, which fills in what every stage shares.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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

from posttrain.envs.scoring import Scorer
from posttrain.errors import RunStopped
from posttrain.evals.evaluate import Evaluator, headline_metrics, write_eval
from posttrain.rollout.base import RolloutEngine
from posttrain.rollout.producer import Rollouts
from posttrain.tracking.heartbeat import Heartbeat
from posttrain.tracking.metrics import MetricsLog, memory_mb
from posttrain.tracking.samples import SampleLog
from posttrain.train.checkpoint import TrainerState, rng_state, rotate, save_checkpoint
from posttrain.train.learner import Learner

T = TypeVar("T")
PROGRESS_EVERY_S = 30.0  # how often a non-terminal log gets a progress line


@dataclass
class RunContext:
    run_dir: Path
    policy: Any  # the model every stage trains; each stage continues from the previous one's weights
    tokenizer: Any
    env: Any  # the run's environment ([env]): evaluation, and training unless a stage overrides its args
    env_name: str
    env_args: dict[str, Any]
    engine: RolloutEngine
    scorer: Scorer
    evaluator: Evaluator
    log: MetricsLog
    console: Console
    teacher: Any = None  # a train.learner.FrozenModel when a stage distils from [teacher]
    stall_timeout_s: float = 900.0
    seed: int = 0
    bf16: bool = False
    compile: bool = False
    chat_template: bool = True
    max_len: int | None = None
    checkpoint_every: int = 0
    keep_last_n: int = 2
    global_step: int = 0  # optimizer steps of the whole run; also the version of the policy's weights
    stage: str = "base"  # the stage running now; its compute is also counted as compute/<stage>_flops
    stage_index: int = 0  # its position in the recipe (checkpoints record it)
    started: float = field(default_factory=time.time)
    elapsed_offset: float = 0.0  # seconds spent before a resume
    totals: dict[str, float] = field(default_factory=dict)  # cumulative counters (tokens, flops, ...)
    evals: dict[str, dict] = field(default_factory=dict)
    stop_requested: str | None = None  # set by the runner's SIGTERM handler; stages stop at the next step end
    samples: SampleLog | None = None  # samples.jsonl
    max_staleness: int = 0  # rollout.max_staleness
    foreign_sampler: bool = False  # rollouts come from another kind of engine than the learner's model (vLLM)
    # Builds a stage's own rollout engine at a policy version (a copy, vLLM, Ray workers); None: the stage's
    # rollouts come from `engine`, in step with training.
    rollout_engines: Callable[[int], RolloutEngine] | None = None
    activation_checkpointing: bool = False  # learner.activation_checkpointing
    # Starts a sharded learner ([learner] world_size > 1): (policy, Learner keyword arguments) -> a LearnerGroup
    # (train/learner_group.py) with the Learner's interface; None: the stage's Learner runs in this process.
    launch_learner: Callable[[Any, dict[str, Any]], Any] | None = None

    def __post_init__(self) -> None:
        self._status = ""
        self.heartbeat = Heartbeat(self.run_dir, stall_timeout_s=self.stall_timeout_s, on_stall=self.note)

    def training_env(self, overrides: dict[str, Any]) -> Any:
        """The environment a stage trains on: [env] with the stage's env_args overrides (evaluation keeps [env])."""
        if not overrides:
            return self.env
        from posttrain.envs import make_env

        return make_env(self.env_name, {**self.env_args, **overrides})

    def learner(self, c: Any, *, total_updates: int) -> Learner:
        """A Learner over the run's policy for a stage section `c` (a config.StageConfig with micro_batch_size):
        its optimizer keys and token budget, the run's padding, precision and compile choice. With a sharded
        learner, a LearnerGroup of ranks (the previous stage's ranks are stopped first)."""
        args = dict(**c.optimizer_args(), total_updates=total_updates, micro_batch_size=c.micro_batch_size,
                    micro_batch_tokens=c.token_budget(self.policy.device.type), pad_id=self.tokenizer.pad_token_id,
                    bf16=self.bf16, compile=self.compile, activation_checkpointing=self.activation_checkpointing)
        if self.launch_learner is None:
            return Learner(self.policy, **args)
        self.close_learner()
        self.phase("learner", "starting the learner ranks")
        self._group = self.launch_learner(self.policy, args)
        return self._group

    def close_learner(self) -> None:
        """Stop a sharded learner's ranks (the runner calls it when the run ends, however it ends)."""
        group, self._group = getattr(self, "_group", None), None
        if group is not None:
            group.close()

    def rollouts(self, make_batches: Callable[[RolloutEngine], Iterator[Any]]) -> Rollouts:
        """A stage's rollout stream (rollout/producer.py): `make_batches(engine)` is its collect() generator."""
        if self.rollout_engines is None:
            return Rollouts(make_batches, self.engine, max_staleness=0, version=self.global_step, own_engine=False)
        engine = self.rollout_engines(self.global_step)
        if hasattr(engine, "on_note"):  # Ray workers report restarts in the run log
            engine.on_note = self.note
        return Rollouts(make_batches, engine, max_staleness=self.max_staleness, version=self.global_step,
                        own_engine=True)

    def phase(self, name: str, detail: str = "") -> None:
        """Announce the phase being entered (heartbeat.json, stall watchdog, fault-injection point)."""
        self.heartbeat.phase(name, detail, step=self.global_step)

    # -- the compute ledger's totals and the metric log ---------------------------------------------------------
    def add_flops(self, **by_kind: float) -> None:
        """Count work: add_flops(generate=..., train=...) adds to compute/<kind>_flops, to compute/flops (all
        work) and to compute/<stage>_flops (the x-axis of one stage's own scaling curve)."""
        for kind, flops in by_kind.items():
            self.add(**{f"compute/{kind}_flops": flops, "compute/flops": flops,
                        f"compute/{self.stage}_flops": flops})

    def add(self, **counters: float) -> None:
        """Add to cumulative counters that are not a kind of work (tokens, wasted FLOPs)."""
        for k, v in counters.items():
            self.totals[k] = self.totals.get(k, 0.0) + v

    def elapsed(self) -> float:
        return self.elapsed_offset + time.time() - self.started

    def write_metrics(self, stage: str, metrics: dict[str, Any]) -> None:
        row = {"step": self.global_step, "stage": stage, "time/elapsed_s": round(self.elapsed(), 3)}
        row.update(self.totals)
        row.update(metrics)
        row.update(memory_mb())
        self.log.log(row)

    def note(self, message: str) -> None:
        """A line for the human: printed above the progress bar and kept in run.log."""
        self.console.print(f"[dim]{escape(message)}[/dim]")
        with (self.run_dir / "run.log").open("a") as f:
            f.write(f"[step {self.global_step}] {message}\n")

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

    def status(self, text: str) -> None:
        self._status = text
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.update(self._task, status=escape(text))

    # -- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint(self, *, stage_step: int, stage_done: bool, learner: dict[str, Any] | None,
                   stage_state: dict[str, Any] | None = None) -> Path:
        """A checkpoint of the running stage (runtime/loop.py writes the stages' own)."""
        state = TrainerState(global_step=self.global_step, stage_index=self.stage_index, stage_step=stage_step,
                             stage_done=stage_done, learner=learner, stage=stage_state or {}, rng=rng_state(),
                             totals=dict(self.totals), elapsed_s=self.elapsed(), evals=self.evals,
                             metrics_offset=self.log.offset())
        self.phase("checkpoint", f"writing step_{self.global_step}")
        path = save_checkpoint(self.run_dir / "checkpoints", self.global_step, self.policy, self.tokenizer, state)
        rotate(self.run_dir / "checkpoints", self.keep_last_n)
        return path

    def record_samples(self, batch: Any, n: int) -> None:
        """n of this step's scored samples, spread over the batch (so over its groups), into samples.jsonl."""
        if self.samples is None or n <= 0 or not len(batch):
            return
        picks = range(0, len(batch), max(1, len(batch) // n))[:n]
        decode = self.tokenizer.decode
        self.samples.log([{"step": self.global_step + 1, "stage": self.stage, "task": batch.tasks[i].id,
                           "prompt": decode(batch.prompts[i]), "completion": decode(batch.completions[i].token_ids),
                           "token_ids": list(batch.completions[i].token_ids),
                           "reward": batch.scores[i].reward, "correct": batch.scores[i].correct,
                           "info": batch.scores[i].info, "finish_reason": batch.completions[i].finish_reason,
                           "policy_version": batch.completions[i].policy_version} for i in picks])

    def due(self, stage_step: int) -> bool:
        """A checkpoint is scheduled at this step, or the run was asked to stop (then it checkpoints now)."""
        return self.stop_requested is not None or (self.checkpoint_every > 0 and stage_step % self.checkpoint_every == 0)

    def stop_if_requested(self) -> None:
        """Call at the end of a step, after its checkpoint: a requested stop ends the run here, nothing lost."""
        if self.stop_requested is not None:
            message = (f"stopped by {self.stop_requested} after step {self.global_step}; a checkpoint was written: "
                       "re-run the same command to resume")
            self.note(message)
            raise RunStopped(message)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, tag: str, *, stage: str, greedy_only: bool = False, log: bool = True) -> dict[str, Any]:
        if self.engine.version != self.global_step:  # a stage forgot update_weights: the numbers would be stale
            raise RuntimeError(f"evaluation '{tag}' would sample weights of version {self.engine.version}, but the "
                               f"policy is at version {self.global_step}; call engine.update_weights first")
        e = self.evaluator
        t0 = time.time()
        self.phase("eval", f"{e.problems} problems x {e.samples} samples")
        result = e(greedy_only=greedy_only)
        result.update({"tag": tag, "step": self.global_step, "stage": stage})
        for warning in [*result.get("warnings", []),
                        *(w for suite in result.get("suites", {}).values() for w in suite.get("warnings", []))]:
            self.note(warning)  # e.g. fewer distinct problems than asked (it says "warning: " itself)
        if not greedy_only:
            write_eval(self.run_dir / "eval" / f"{tag}.json", result)
            self.evals[tag] = dict(headline_metrics(result))
        if log:
            self.write_metrics(stage, {**headline_metrics(result), "time/eval_s": time.time() - t0})
        return result
