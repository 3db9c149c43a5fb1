"""Run a recipe: prepare the run directory, resume from the newest complete checkpoint, build the run's parts
(policy, tokenizer, environment, rollout engine, scorer, evaluator), run the stages in order through the stage
registry (posttrain/stages.py), save the final model and a summary.

Resume is automatic: running the same recipe again continues from its newest complete checkpoint (or prints the
summary if the run finished). A run directory holding a different config is an error unless --fresh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import torch
from rich.console import Console

from posttrain import integrity, kernels, rundir
from posttrain.config import RunConfig, to_toml
from posttrain.data.prompts import context_length, stop_token_ids, tokenizer_line, tokenizer_summary
from posttrain.envs import make_env
from posttrain.envs.scoring import Scorer, shutdown_pool
from posttrain.errors import RunStopped, Terminated, UserError
from posttrain.evals.evaluate import Evaluator
from posttrain.models import (
    attention_for,
    check_same_tokenizer,
    explain_bf16,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
)
from posttrain.models.lora import attach_lora, is_lora, merged_copy
from posttrain.models.lora import describe as lora_counts
from posttrain.models.sources import model_note
from posttrain.rollout.base import RolloutEngine, build_engine
from posttrain.runtime.context import RunContext
from posttrain.stages import Stage, StageResume, StageState, load_stages
from posttrain.tracking.metrics import MetricsLog, memory_mb, truncate_metrics
from posttrain.tracking.samples import SampleLog
from posttrain.train.checkpoint import (
    STATE_FILE,
    latest_checkpoint,
    load_state,
    save_model_dir,
    set_rng_state,
)
from posttrain.train.learner import FrozenModel


def intra_op_threads(threads: int | None) -> int:
    """The recipe's `threads`, else OMP_NUM_THREADS (several jobs sharing a machine), else the cores this process
    may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return threads or (int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0)))


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
    run_dir, note = rundir.prepare(cfg.run_dir, config, to_toml(cfg), fresh=fresh)
    torch.set_num_threads(intra_op_threads(cfg.threads))
    torch.manual_seed(cfg.seed)
    stages = load_stages()

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    state = load_state(ckpt, stages=len(cfg.recipe)) if ckpt else None
    truncate_metrics(run_dir, state.metrics_offset if state else 0)
    # The recipe's model.path, where it is loaded: at the start, and under a LoRA checkpoint (which holds the adapter
    # only) on resume. A full checkpoint needs nothing else.
    source_dir = resolve_model_path(cfg.model.path, cfg.seed) if cfg.model.lora or not ckpt else None
    model_dir = ckpt or source_dir
    device = resolve_device(cfg.model.device)
    base_dir = source_dir if cfg.model.lora else model_dir
    model = load_model(base_dir, attention=attention_for(device, cfg.model.attention))
    if cfg.model.lora:
        model = attach_lora(model, cfg.model.lora, adapter_dir=ckpt)
    model = model.to(device)
    tokenizer = load_tokenizer(model_dir, require_chat_template=cfg.model.chat_template)
    env = make_env(cfg.env.name, cfg.env.args)
    step = state.global_step if state else 0
    bf16, precision_why = explain_bf16(cfg.model.bf16, device)
    rundir.record_precision(run_dir, cfg.model.bf16, bf16, precision_why)
    stop_ids = stop_token_ids(tokenizer, model.generation_config, chat_template=cfg.model.chat_template)
    tokens = tokenizer_summary(tokenizer, stop_ids, chat_template=cfg.model.chat_template)
    rundir.record_tokenizer(run_dir, tokens)
    engine = build_engine(cfg.rollout.engine, model, tokenizer, weights=cfg.rollout.weights, bf16=bf16, version=step,
                          stop_ids=stop_ids, engine_args=cfg.rollout.engine_args)
    teacher = load_teacher(cfg, tokenizer, device, bf16) if cfg.uses_teacher() else None
    scorer = Scorer(env, timeout_s=cfg.env.score_timeout_s, failure_reward=cfg.env.failure_reward,
                    max_error_frac=cfg.env.max_error_frac, control=cfg.env.reward, control_args=cfg.env.reward_args)
    e, max_len = cfg.eval, context_length(model)
    evaluator = Evaluator(engine, tokenizer, env, scorer.never_stopping().verifier_only(), problems=e.problems, samples=e.samples, ks=e.ks,
                          temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens, seed=cfg.seed,
                          chat_template=cfg.model.chat_template, max_len=max_len,
                          suites=[(x.label, make_env(x.name, x.args), x.problems or e.problems) for x in e.suites])
    if cfg.distributed.backend == "ray":  # training verifiers run as Ray tasks; evaluation scores here
        from posttrain.dist import RayScoring

        scorer = dataclasses.replace(scorer, score_fn=RayScoring(cfg.distributed.num_rollout_workers))
    ctx = RunContext(run_dir=run_dir, policy=model, tokenizer=tokenizer, teacher=teacher, env=env,
                     env_name=cfg.env.name, env_args=dict(cfg.env.args), engine=engine, scorer=scorer,
                     evaluator=evaluator,
                     log=MetricsLog(run_dir, resume_step=state.global_step if state else None,
                                    tensorboard=cfg.tracking.tensorboard, sinks=_sinks(cfg, run_dir)),
                     samples=SampleLog(run_dir, resume_step=state.global_step if state else None),
                     console=console, stall_timeout_s=cfg.stall_timeout_s, seed=cfg.seed,
                     bf16=bf16, compile=cfg.model.compile,
                     chat_template=cfg.model.chat_template, max_len=max_len, checkpoint_every=cfg.checkpoint.every,
                     keep_last_n=cfg.checkpoint.keep_last_n, global_step=step,
                     max_staleness=cfg.rollout.max_staleness, foreign_sampler=cfg.rollout.engine != "local",
                     rollout_engines=rollout_engine_factory(cfg, model, tokenizer, bf16=bf16, stop_ids=stop_ids),
                     activation_checkpointing=cfg.learner.activation_checkpointing,
                     launch_learner=learner_launcher(cfg, run_dir))
    ctx.note(f"precision: {'bf16 autocast' if bf16 else 'fp32'} ({precision_why})")
    ctx.note(tokenizer_line(tokens))
    if source_dir is not None and (origin := model_note(source_dir)) is not None:  # converted from a GGUF
        ctx.note(f"model: {origin}")
    if kernels.alignment_sensitive():  # posttrain/kernels.py: the cause of the long-run drift of issue 36
        ctx.note(f"warning: this process's fp32 matrix products round by memory alignment (MKL_CBWR="
                 f"{os.environ.get('MKL_CBWR')!r}, or a torch product ran before posttrain was imported): fp32 runs "
                 "will not repeat bit for bit; set MKL_CBWR=AUTO,STRICT before the first torch product")
    if note:
        ctx.note(note)
    if getattr(env, "warning", None):  # an environment's own caveat (e.g. a weaker code sandbox chosen by name)
        ctx.note(f"warning: {env.warning}")
    how, changed = integrity.modified_files()
    if changed:
        ctx.note(f"posttrain's own source differs from what {how} records: {', '.join(changed[:8])}"
                 + (f" and {len(changed) - 8} more" if len(changed) > 8 else ""))
    if cfg.model.lora:
        counts = lora_counts(model)
        ctx.note(f"model.lora: {counts['trainable']:,} trainable of {counts['total']:,} parameters "
                 f"(r={cfg.model.lora.r}, alpha={cfg.model.lora.alpha:g}, {cfg.model.lora.target_modules})")
    if cfg.model.bf16 == "auto":
        ctx.note(f"model.bf16 = auto: {'bf16 autocast' if bf16 else 'fp32'} on {device} "
                 f"({'bf16 matrix units found' if bf16 else 'no bf16 matrix units: bf16 would be emulated, far slower'})")
    stop.attach(ctx)
    try:
        if state:
            ctx.totals, ctx.evals, ctx.elapsed_offset = state.totals, state.evals, state.elapsed_s
            console.print(f"resuming {run_dir} from {ckpt.name} (stage {cfg.recipe[state.stage_index]})")
        else:
            _stop_before_training(ctx)  # a SIGTERM while the run was starting
            if cfg.eval.at_start:
                with stop.abandoning():  # nothing to checkpoint yet: a SIGTERM abandons the evaluation at once
                    ctx.evaluate("base", stage="base")
                _stop_before_training(ctx)
        for i, name in enumerate(cfg.recipe):
            if state and (i < state.stage_index or (i == state.stage_index and state.stage_done)):
                continue
            ctx.stop_if_requested()
            stage, resume = stages.get(name), None
            if state and state.stage_index == i:
                set_rng_state(state.rng)
                resume = StageResume(stage_step=state.stage_step, learner=state.learner,
                                     state=_stage_state(stage, state.stage, ckpt))
            ctx.stage, ctx.stage_index = name, i
            rundir.record_stage(run_dir, name, resumed=resume is not None)
            stage.run(ctx, cfg.section(name), resume)
            state = None
        final = run_dir / "final"
        tmp = run_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        if is_lora(model):  # final/ is a plain model every tool loads; the adapter beside it in final/adapter/
            save_model_dir(tmp, merged_copy(model), tokenizer)
            save_model_dir(tmp / "adapter", model, tokenizer)
        else:
            save_model_dir(tmp, model, tokenizer)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        summary = {"run_dir": str(run_dir), "steps": ctx.global_step, "elapsed_s": round(ctx.elapsed(), 1),
                   "evals": ctx.evals, "final_model": str(final), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "precision": "bf16" if bf16 else "fp32", **rundir.cpu_kind(),
                   "peak_rss_mb": memory_mb()["perf/peak_rss_mb"]}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        (run_dir / rundir.DONE).write_text("")
        return summary
    finally:
        stop.attach(None)
        ctx.heartbeat.close()
        ctx.log.close()
        if ctx.samples is not None:
            ctx.samples.close()
        ctx.close_learner()
        engine.close()
        shutdown_pool()


def _stage_state(stage: Stage, saved: dict[str, Any], ckpt: Path) -> StageState:
    """A checkpoint's `stage` table read back into the stage's state class; a table that does not fit it (a
    hand-edited checkpoint, another version's) is one line naming the file."""
    try:
        return stage.state.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise UserError(f"{ckpt / STATE_FILE}: stage: not the state of stage {stage.name!r}: {e}") from None


def rollout_engine_factory(cfg: RunConfig, model: Any, tokenizer: Any, *, bf16: bool,
                           stop_ids: set[int]) -> Callable[[int], RolloutEngine] | None:
    """How a stage gets rollout engines of its own: Ray workers ([distributed] backend = 'ray'), or for
    asynchronous RL in this process a copy of the run's engine kind; None: rollouts use the run's engine."""
    if cfg.distributed.backend == "ray":
        def ray_workers(version: int) -> RolloutEngine:
            from posttrain.dist import RayEngine  # dist/ is the only package that imports Ray

            return RayEngine(cfg.distributed, engine=cfg.rollout.engine, engine_args=cfg.rollout.engine_args,
                             model=model, tokenizer=tokenizer, bf16=bf16, stop_ids=stop_ids, version=version)
        return ray_workers
    if cfg.rollout.max_staleness > 0:
        return lambda version: build_engine(cfg.rollout.engine, model, tokenizer, weights="copy", bf16=bf16,
                                            version=version, stop_ids=stop_ids, engine_args=cfg.rollout.engine_args)
    return None


def learner_launcher(cfg: RunConfig, run_dir: Path) -> Callable[[Any, dict[str, Any]], Any] | None:
    """How a stage starts a sharded learner ([learner] world_size > 1): ranks as local processes or Ray actors,
    each building a Learner with the stage's arguments over its shard of the policy. None: one process."""
    lc = cfg.learner
    if not lc.sharded:
        return None
    threads = lc.threads_per_rank or max(1, intra_op_threads(cfg.threads) // lc.world_size)

    def launch(policy: Any, learner_args: dict[str, Any]) -> Any:
        from posttrain.train.learner_group import LearnerSpec, LocalRanks, launch_group

        if lc.launch == "ray":
            from posttrain.dist import RayRanks  # dist/ is the only package that imports Ray

            ranks = RayRanks(lc.world_size, threads=threads, cpus_per_rank=lc.cpus_per_rank,
                             gpus_per_rank=lc.gpus_per_rank, cluster=cfg.distributed)
        else:
            ranks = LocalRanks(lc.world_size, threads=threads)
        spec = LearnerSpec(type(policy), policy.config, learner_args, offload_optimizer=lc.offload_optimizer)
        return launch_group(policy, spec, ranks, scratch=run_dir / ".learner-shards")
    return launch


def teacher_tokenizer(cfg: RunConfig, policy_tokenizer: Any) -> Path:
    """The teacher's checkpoint directory, after checking that its tokenizer is the policy's."""
    assert cfg.teacher is not None
    path = resolve_model_path(cfg.teacher.path, cfg.seed, key="teacher.path")
    check_same_tokenizer(policy_tokenizer, load_tokenizer(path, require_chat_template=False),
                         f"teacher.path={cfg.teacher.path!r}")
    return path


def load_teacher(cfg: RunConfig, policy_tokenizer: Any, device: torch.device, bf16: bool) -> FrozenModel:
    """[teacher] as a frozen model on the policy's device; its forward passes count as compute/teacher_flops."""
    assert cfg.teacher is not None
    path = teacher_tokenizer(cfg, policy_tokenizer)
    model = load_model(path, attention=attention_for(device, cfg.model.attention)).to(device)
    model.eval().requires_grad_(False)
    return FrozenModel(model, micro_batch_size=cfg.teacher.micro_batch_size, pad_id=policy_tokenizer.pad_token_id,
                       bf16=bf16, micro_batch_tokens=2048 if device.type == "cpu" else 16_384)


def _sinks(cfg: RunConfig, run_dir) -> list:
    """The optional metric sinks the recipe asks for ([tracking])."""
    t = cfg.tracking
    if not t.wandb:
        return []
    from posttrain.tracking.wandb_sink import WandbSink

    return [WandbSink(run_dir, project=t.wandb_project, entity=t.wandb_entity, name=t.wandb_name or cfg.name,
                      mode=t.wandb_mode, tags=t.wandb_tags, config=cfg.model_dump(mode="json"))]


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
        """The run whose stages see the request (ctx.stop_requested), from now on and any made already."""
        self.ctx = ctx
        if ctx is not None:
            ctx.stop_requested = self.requested

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
            self.ctx.stop_requested = self.requested
        if self.abandon:
            raise Terminated


def _stop_before_training(ctx: RunContext) -> None:
    """A stop requested before the first step: there is no checkpoint to write, so a re-run starts over."""
    if ctx.stop_requested is not None:
        message = (f"stopped by {ctx.stop_requested} before the first training step (no checkpoint yet): re-run "
                   "the same command to start it again")
        ctx.note(message)
        raise RunStopped(message)
