"""The composition root: a recipe's config turned into the run's parts, once, at the start of a run (or of its
resume). Nothing below the runner reads the recipe again except a stage's own section.

    ctx = build_context(cfg, run_dir, ckpt=ckpt, state=state, console=console)

builds the policy (from model.path, or the checkpoint it resumes), its tokenizer, the environment, the rollout
engine, the scorer, the evaluator, the teacher, how a stage gets rollout engines and a sharded learner of its
own, the metric and sample logs, and writes the run's start notes (precision, tokenizer, model origin, caveats).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from posttrain import integrity, kernels, rundir
from posttrain.config import RunConfig
from posttrain.data.prompts import context_length, stop_token_ids, tokenizer_line, tokenizer_summary
from posttrain.envs import make_env
from posttrain.envs.scoring import Scorer
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
from posttrain.models.lora import attach_lora
from posttrain.models.lora import describe as lora_counts
from posttrain.models.sources import model_note
from posttrain.rollout.base import RolloutEngine, build_engine
from posttrain.runtime.context import RunContext
from posttrain.runtime.ledger import Ledger
from posttrain.runtime.parts import RunParts
from posttrain.runtime.services import Services
from posttrain.runtime.state import RunState
from posttrain.tracking.metrics import MetricsLog
from posttrain.tracking.samples import SampleLog
from posttrain.train.checkpoint import TrainerState
from posttrain.train.learner import FrozenModel


def intra_op_threads(threads: int | None) -> int:
    """The recipe's `threads`, else OMP_NUM_THREADS (several jobs sharing a machine), else the cores this process
    may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return threads or (int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0)))


def build_context(cfg: RunConfig, run_dir: Path, *, ckpt: Path | None, state: TrainerState | None,
                  console: Console) -> RunContext:
    """The run's context at its start, or at the checkpoint `ckpt` (whose trainer state is `state`)."""
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
    evaluator = Evaluator(engine, tokenizer, env, scorer.never_stopping().verifier_only(), problems=e.problems,
                          samples=e.samples, ks=e.ks, temperature=e.temperature, top_p=e.top_p,
                          max_new_tokens=e.max_new_tokens, seed=cfg.seed, chat_template=cfg.model.chat_template,
                          max_len=max_len,
                          suites=[(x.label, make_env(x.name, x.args), x.problems or e.problems) for x in e.suites])
    if cfg.distributed.backend == "ray":  # training verifiers run as Ray tasks; evaluation scores here
        from posttrain.dist import RayScoring

        scorer = dataclasses.replace(scorer, score_fn=RayScoring(cfg.distributed.num_rollout_workers))
    parts = RunParts(run_dir=run_dir, policy=model, tokenizer=tokenizer, teacher=teacher, env=env,
                     env_name=cfg.env.name, env_args=dict(cfg.env.args), engine=engine, scorer=scorer,
                     evaluator=evaluator, seed=cfg.seed, bf16=bf16, compile=cfg.model.compile,
                     chat_template=cfg.model.chat_template, max_len=max_len, checkpoint_every=cfg.checkpoint.every,
                     keep_last_n=cfg.checkpoint.keep_last_n, max_staleness=cfg.rollout.max_staleness,
                     foreign_sampler=cfg.rollout.engine != "local",
                     rollout_engines=rollout_engine_factory(cfg, model, tokenizer, bf16=bf16, stop_ids=stop_ids),
                     activation_checkpointing=cfg.learner.activation_checkpointing,
                     launch_learner=learner_launcher(cfg, run_dir))
    run_state = RunState(global_step=step)
    if state:
        run_state.evals, run_state.elapsed_offset = state.evals, state.elapsed_s
    resume_step = state.global_step if state else None
    ctx = RunContext(parts, Services(run_dir, console, run_state, stall_timeout_s=cfg.stall_timeout_s),
                     Ledger(state.totals if state else None), run_state,
                     log=MetricsLog(run_dir, resume_step=resume_step, tensorboard=cfg.tracking.tensorboard,
                                    sinks=_sinks(cfg, run_dir)),
                     samples=SampleLog(run_dir, resume_step=resume_step))
    note = ctx.services.note
    note(f"precision: {'bf16 autocast' if bf16 else 'fp32'} ({precision_why})")
    note(tokenizer_line(tokens))
    if source_dir is not None and (origin := model_note(source_dir)) is not None:  # converted from a GGUF
        note(f"model: {origin}")
    if kernels.alignment_sensitive():  # posttrain/kernels.py: the cause of the long-run drift of issue 36
        note(f"warning: this process's fp32 matrix products round by memory alignment (MKL_CBWR="
             f"{os.environ.get('MKL_CBWR')!r}, or a torch product ran before posttrain was imported): fp32 runs "
             "will not repeat bit for bit; set MKL_CBWR=AUTO,STRICT before the first torch product")
    return ctx


def start_notes(ctx: RunContext, cfg: RunConfig, prepared: str | None) -> None:
    """What the run directory's preparation said, then the run's caveats: an environment's own warning, a
    modified posttrain source, the LoRA parameter count, what bf16 = "auto" chose."""
    note = ctx.services.note
    if prepared:
        note(prepared)
    env = ctx.parts.env
    if getattr(env, "warning", None):  # an environment's own caveat (e.g. a weaker code sandbox chosen by name)
        note(f"warning: {env.warning}")
    how, changed = integrity.modified_files()
    if changed:
        note(f"posttrain's own source differs from what {how} records: {', '.join(changed[:8])}"
             + (f" and {len(changed) - 8} more" if len(changed) > 8 else ""))
    if cfg.model.lora:
        counts = lora_counts(ctx.parts.policy)
        note(f"model.lora: {counts['trainable']:,} trainable of {counts['total']:,} parameters "
             f"(r={cfg.model.lora.r}, alpha={cfg.model.lora.alpha:g}, {cfg.model.lora.target_modules})")
    if cfg.model.bf16 == "auto":
        bf16, device = ctx.parts.bf16, ctx.parts.policy.device
        note(f"model.bf16 = auto: {'bf16 autocast' if bf16 else 'fp32'} on {device} "
             f"({'bf16 matrix units found' if bf16 else 'no bf16 matrix units: bf16 would be emulated, far slower'})")


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


