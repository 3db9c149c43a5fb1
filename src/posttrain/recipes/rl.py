"""RL with verifiable rewards: the GRPO family as one loop over registry entries (DESIGN.md, "The RL step").

    posttrain run recipes/quickstart.toml                    # SFT warm-up, then this stage
    posttrain run recipes/quickstart.toml --set rl.preset=dapo

Which method runs is decided only by `[rl]` keys naming registry entries (advantage, policy_loss, aggregation,
kl_estimator, is_correction, group_filter); presets in posttrain/presets/*.toml are sets of those keys. Nothing
below branches on a method's name.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.algos import (
    ADVANTAGES,
    AGGREGATIONS,
    IS_CORRECTIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    adapt_clip_high,
    effective_sample_size,
    group_has_variance,
    normalisers_for,
    overlong_penalty,
    should_reset_reference,
)
from posttrain.data.prompts import render_prompt
from posttrain.errors import UserError
from posttrain.models.layout import distinct_prompts
from posttrain.records import Completion, SamplingParams, Score, Task
from posttrain.runtime.context import RunContext
from posttrain.tracking.ledger import TRAIN_MULTIPLIER, FlopModel
from posttrain.train.checkpoint import restore_training_state
from posttrain.train.forward import completion_logprobs, logprobs_no_grad, pack
from posttrain.train.guards import UpdateGuard
from posttrain.train.optim import build_optimizer, build_scheduler


@dataclass(frozen=True)
class Rollouts:
    """One step's samples, B = groups x group_size, flattened group by group."""

    tasks: list[Task]
    prompts: list[list[int]]
    completions: list[Completion]
    scores: list[Score]
    group_ids: Tensor  # (B,) long


def run_stage(ctx: RunContext, stage_index: int, resume: dict | None) -> None:
    c, model, tok = ctx.cfg.rl, ctx.model, ctx.tokenizer
    env = ctx.training_env(c.env_args)
    advantage_fn, loss_fn = ADVANTAGES.get(c.advantage), POLICY_LOSSES.get(c.policy_loss)
    aggregate, kl_fn, is_fn = AGGREGATIONS.get(c.aggregation), KL_ESTIMATORS.get(c.kl_estimator), \
        IS_CORRECTIONS.get(c.is_correction)
    model.train()
    optimizer = build_optimizer(model, lr=c.lr, weight_decay=c.weight_decay, betas=c.betas)
    total_updates = c.steps * c.epochs * c.mini_batches
    scheduler = build_scheduler(optimizer, total_steps=total_updates, warmup_steps=c.warmup_steps,
                                schedule=c.schedule, min_lr_ratio=c.min_lr_ratio)
    # The reference policy exists only when a KL term does; it starts as the policy at the start of the stage.
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if c.kl_coef > 0 else None
    state = {"eps_high": c.eps_high, "last_reset": 0, "val_history": [], "bad_steps": 0, "history": {}}
    start, cursor = restore_training_state(optimizer, scheduler, resume)
    if resume:
        state.update(resume["extra"]["state"])
        if ref_model is not None:
            ref_model.load_state_dict(resume["extra"]["ref"])

    guard = UpdateGuard(c.max_bad_steps, state["bad_steps"])
    tasks = itertools.islice(task_stream(env, ctx.cfg.seed), cursor, None)
    flops = FlopModel.from_model(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def save(stage_step: int, done: bool) -> None:
        extra = {"state": state, "ref": ref_model.state_dict() if ref_model is not None else None}
        ctx.checkpoint(stage_index=stage_index, stage_step=stage_step, stage_done=done, optimizer=optimizer,
                       scheduler=scheduler, cursor=cursor, extra=extra)
        write_prompt_history(ctx, state["history"])

    def end_step(stage_step: int, metrics: dict, t_step: float) -> None:
        """Log the step, then what is scheduled at it: evaluation, reference reset, checkpoint. Runs after every
        step, including one whose groups were all degenerate (no update), so the schedule never skips a point."""
        metrics["time/step_s"] = time.time() - t_step
        ctx.status(f"reward {metrics['rollout/reward_mean']:.3f}")
        ctx.write_metrics("rl", metrics)
        if c.eval_every and stage_step % c.eval_every == 0 and stage_step < c.steps:
            result = ctx.evaluate(f"rl-step{stage_step}", stage="rl")
            state["val_history"].append((stage_step, result.get("mean@n", {}).get("mean", result["greedy_acc"])))
        if ref_model is not None and should_reset_reference(stage_step, state["last_reset"], state["val_history"],
                                                            every=c.ref_reset_every, patience=c.ref_reset_patience):
            ref_model.load_state_dict(model.state_dict())
            state["last_reset"] = stage_step
            if c.ref_reset_optimizer:
                optimizer.state.clear()
            ctx.note(f"rl step {stage_step}: reference policy reset to the current policy"
                     + (" (optimizer state cleared)" if c.ref_reset_optimizer else ""))
            ctx.write_metrics("rl", {"ctrl/ref_reset": 1})
        if ctx.due(stage_step) and stage_step < c.steps:
            save(stage_step, done=False)

    if not resume and c.eval_every:  # the curve's first point: the policy RL starts from, at zero RL compute
        ctx.add(**{"compute/rl_flops": 0.0})
        ctx.evaluate("rl-step0", stage="rl")

    for step in ctx.progress(range(start, c.steps), total=c.steps, completed=start, description="rl"):
        t_step = time.time()
        sample_seed = ctx.cfg.seed * 1_000_003 + ctx.global_step

        # 1-3. pick prompts, sample groups, score; group filtering (dynamic sampling refills) -------------------
        t0 = time.time()

        def sample(chunk: list[Task], round_: int, seed: int = sample_seed) -> Rollouts:
            params = SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                    max_new_tokens=c.max_new_tokens, seed=seed + 7919 * round_)
            return rollout(ctx, env, chunk, params, c.group_size)

        batch, seen, rounds, consumed = collect_groups(sample, tasks,
            prompts_per_step=c.prompts_per_step, group_filter=c.group_filter, max_refill_rounds=c.max_refill_rounds)
        cursor += consumed
        record_visits(state["history"], seen, step=ctx.global_step + 1)
        gen_tokens = sum(len(x.token_ids) for x in seen.completions)
        gen_flops, kept_gen_flops = generation_flops(flops, seen), generation_flops(flops, batch)
        t_generate = time.time() - t0
        metrics = rollout_metrics(seen)
        metrics["rollout/refill_rounds"] = rounds - 1
        ctx.add(**{"compute/generate_flops": gen_flops, "compute/wasted_flops": gen_flops - kept_gen_flops,
                   "compute/flops": gen_flops, "rollout/tokens": gen_tokens})
        metrics["rollout/kept_samples"] = len(batch.completions)

        if not batch.completions:  # every group was degenerate: nothing to learn from this step
            ctx.global_step += 1
            end_step(step + 1, {**metrics, "time/generate_s": t_generate}, t_step)
            continue

        # 4. rewards -> advantages -------------------------------------------------------------------------------
        B = len(batch.completions)
        prompts = batch.prompts
        comps = [list(x.token_ids) for x in batch.completions]
        mask = pad([[1.0] * len(x) for x in comps])  # (B, T)
        if c.mask_truncated:
            mask = mask * torch.tensor([x.finish_reason != "length" for x in batch.completions]).float()[:, None]
        sampler_lp = pad([list(x.logprobs) for x in batch.completions])  # (B, T)
        rewards = torch.tensor([s.reward for s in batch.scores], dtype=torch.float)
        if c.overlong_cache > 0:
            lengths = torch.tensor([len(x) for x in comps])
            rewards = rewards + overlong_penalty(lengths, max_len=c.max_new_tokens, cache=c.overlong_cache)

        # 5. reference / old logprobs (only the passes this configuration needs) --------------------------------
        t0 = time.time()
        logprob_flops = sum(shared_prefix_flops(flops, prompts, comps, rows)
                            for rows in torch.arange(B).split(c.micro_batch_size))
        ctx.phase("logprobs", "reference / old-policy forward passes")
        ref_lp = None
        if ref_model is not None:
            ref_lp = pad(logprobs_no_grad(ref_model, prompts, comps, tok.pad_token_id, temperature=c.temperature,
                                          bf16=ctx.cfg.model.bf16, micro_batch_size=c.micro_batch_size))
            ctx.add(**{"compute/ref_flops": logprob_flops, "compute/flops": logprob_flops})
            if c.kl_placement == "reward":  # sequence reward minus beta * summed per-token KL (REINFORCE++ style)
                rewards = rewards - c.kl_coef * (kl_fn(sampler_lp, ref_lp) * mask).sum(-1)
        if c.recompute_old_logprobs:
            old_lp = pad(logprobs_no_grad(ctx.learner, prompts, comps, tok.pad_token_id, temperature=c.temperature,
                                          bf16=ctx.cfg.model.bf16, micro_batch_size=c.micro_batch_size))
            ctx.add(**{"compute/old_flops": logprob_flops, "compute/flops": logprob_flops})
        else:  # the engine runs this very module: its logprobs are the learner's (tests/test_engine.py)
            old_lp = sampler_lp
        is_weights = is_fn(old_lp, sampler_lp, mask, cap=c.is_cap)
        metrics["is/weight_max"] = float((is_weights * mask).max())
        metrics["is/ess"] = float(effective_sample_size(is_weights, mask))
        advantages = advantage_fn(rewards, batch.group_ids, eps=c.adv_eps)  # (B,)
        metrics["rollout/adv_abs_mean"] = float(advantages.abs().mean())
        t_logprob = time.time() - t0

        # 6. update: epochs x mini-batches of whole groups x micro-batches, global normalisers per mini-batch -----
        t0 = time.time()
        ctx.phase("train", f"{c.epochs} epoch(s) x {c.mini_batches} mini-batch(es) over {B} completions")
        sums = {"loss": 0.0, "pg/clip_frac": 0.0, "pg/entropy": 0.0, "kl/value": 0.0, "pg/ratio_mean": 0.0}
        grad_norms, updates, tokens_seen, trained_tokens, trained, train_flops = [], 0, 0, 0, [], 0.0
        # A sample whose advantage is exactly 0 contributes exactly 0 to every policy loss and its gradient, so
        # unless a KL-in-loss or entropy term gives it one, its forward/backward is skipped. The normalisers
        # still count its tokens, so the loss and the update are unchanged (up to float summation order).
        per_sample_terms = c.entropy_coef != 0 or (ref_model is not None and c.kl_placement == "loss")
        skippable = (advantages == 0) if c.skip_zero_advantage and not per_sample_terms else torch.zeros(B, dtype=bool)
        for epoch in range(c.epochs):
            for mb_rows in split_groups(batch.group_ids, c.mini_batches, seed=sample_seed + epoch):
                norm, group_tokens = normalisers_for(mask[mb_rows], batch.group_ids[mb_rows], c.max_new_tokens)
                tokens_seen += norm.total_tokens
                run_rows = mb_rows[~skippable[mb_rows]]
                trained += run_rows.tolist()
                for rows in run_rows.split(c.micro_batch_size) if len(run_rows) else ():
                    packed = pack([prompts[i] for i in rows], [comps[i] for i in rows], tok.pad_token_id)
                    train_flops += TRAIN_MULTIPLIER * shared_prefix_flops(flops, prompts, comps, rows)
                    width = packed.targets.shape[1]
                    lp, entropy = completion_logprobs(ctx.learner, packed, temperature=c.temperature,
                                                      bf16=ctx.cfg.model.bf16, with_entropy=True)
                    dev = lp.device  # rollout tensors live on the CPU; the learner's on the model's device
                    m = mask[rows, :width].to(dev)
                    adv = advantages[rows, None].expand(-1, width).to(dev)
                    per_token, parts = loss_fn(lp, old_lp[rows, :width].to(dev), adv, m,
                                               is_weights=is_weights[rows, :width].to(dev), eps_low=c.eps_low,
                                               eps_high=state["eps_high"], dual_clip=c.dual_clip)
                    if ref_lp is not None:
                        kl = kl_fn(lp, ref_lp[rows, :width].to(dev))
                        if c.kl_placement == "loss":
                            per_token = per_token + c.kl_coef * kl
                        sums["kl/value"] += float((kl.detach() * m).sum())
                    if c.entropy_coef:
                        per_token = per_token - c.entropy_coef * entropy
                    loss = aggregate(per_token, m, norm=norm,
                                     group_tokens=group_tokens[index_in(mb_rows, rows)].to(dev))
                    loss.backward()
                    sums["loss"] += loss.item()
                    sums["pg/clip_frac"] += float((parts["clip_frac"] * m).sum())
                    sums["pg/ratio_mean"] += float((parts["ratio"] * m).sum())
                    sums["pg/entropy"] += float((entropy.detach() * m).sum())
                    trained_tokens += int(m.sum())
                for p in params:  # an all-skipped mini-batch is a zero gradient, not no step (Adam still moves)
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                grad_norm = ctx.optimizer_step(params, optimizer, scheduler, guard, loss=sums["loss"],
                                               grad_clip=c.grad_clip, where=f"rl step {step + 1}")
                state["bad_steps"] = guard.bad_steps
                grad_norms.append(grad_norm)
                updates += 1
        t_train = time.time() - t0
        ctx.add(**{"compute/train_flops": train_flops, "compute/flops": train_flops, "train/tokens": tokens_seen})
        metrics["train/skipped_frac"] = 1 - len(trained) / max(1, B * c.epochs)
        denom = max(1, trained_tokens)  # pg/* and kl/* are means over the tokens that were trained
        metrics.update({
            "train/loss": sums["loss"] / max(1, updates), "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/lr": scheduler.get_last_lr()[0], "pg/clip_frac": sums["pg/clip_frac"] / denom,
            "pg/entropy": sums["pg/entropy"] / denom, "pg/ratio_mean": sums["pg/ratio_mean"] / denom,
            "kl/value": sums["kl/value"] / denom, "pg/eps_high": state["eps_high"], "train/updates": updates,
            "time/generate_s": t_generate, "time/logprob_s": t_logprob, "time/train_s": t_train,
            "perf/gen_tokens_per_s": gen_tokens / max(t_generate, 1e-9),
            "perf/train_tokens_per_s": sum(len(prompts[i]) + len(comps[i]) for i in trained) / max(t_train, 1e-9),
        })
        ctx.global_step += 1

        # 7. controllers between steps -------------------------------------------------------------------------
        if c.entropy_target is not None:
            new_eps = adapt_clip_high(state["eps_high"], metrics["pg/entropy"], target_low=c.entropy_target[0],
                                      target_high=c.entropy_target[1], step_size=c.entropy_adapt_step,
                                      min_eps=c.eps_high_bounds[0], max_eps=c.eps_high_bounds[1])
            if new_eps != state["eps_high"]:
                ctx.note(f"entropy {metrics['pg/entropy']:.3f} outside {list(c.entropy_target)}: "
                         f"eps_high {state['eps_high']:.3f} -> {new_eps:.3f}")
                state["eps_high"] = new_eps

        # 8. log, evaluate, reset the reference, checkpoint ------------------------------------------------------
        end_step(step + 1, metrics, t_step)

    ctx.evaluate("rl", stage="rl")
    save(c.steps, done=True)


# ---------------------------------------------------------------------------------------------------------------
# Small helpers the loop above composes.


def task_stream(env, seed: int) -> Iterator[Task]:
    """Training tasks forever: a finite dataset is replayed epoch after epoch in a fresh order."""
    for epoch in itertools.count():
        empty = True
        for task in env.tasks("train", seed + epoch):
            empty = False
            yield task
        if empty:
            raise UserError(f"environment {env.name!r} yields no training tasks")


def rollout(ctx: RunContext, env, tasks: list[Task], params: SamplingParams, group_size: int) -> Rollouts:
    prompts = [render_prompt(ctx.tokenizer, env.prompt(t), chat_template=ctx.cfg.model.chat_template,
                             max_len=ctx.max_len) for t in tasks]
    flat_prompts = [p for p in prompts for _ in range(group_size)]
    flat_tasks = [t for t in tasks for _ in range(group_size)]
    ctx.phase("generate", f"{len(flat_prompts)} completions of up to {params.max_new_tokens} tokens")
    completions = ctx.engine.generate(flat_prompts, params)
    scores = ctx.score(flat_tasks, [x.text for x in completions], env=env)
    group_ids = torch.arange(len(tasks)).repeat_interleave(group_size)
    return Rollouts(flat_tasks, flat_prompts, completions, scores, group_ids)


def collect_groups(sample: Callable[[list[Task], int], Rollouts], tasks: Iterator[Task], *, prompts_per_step: int,
                   group_filter: str, max_refill_rounds: int) -> tuple[Rollouts, Rollouts, int, int]:
    """Sample `prompts_per_step` groups; filter degenerate ones (all rewards equal, ScaleRL) and, for DAPO's
    dynamic sampling, sample more prompts until the batch holds `prompts_per_step` useful groups or
    `max_refill_rounds` extra rounds are spent. -> (kept, everything sampled, rounds, tasks consumed)."""
    kept: Rollouts | None = None
    seen: Rollouts | None = None
    rounds = consumed = 0
    while True:
        chunk = list(itertools.islice(tasks, prompts_per_step - (num_groups(kept) if kept else 0)))
        consumed += len(chunk)
        new = sample(chunk, rounds)
        seen = new if seen is None else concat(seen, new)
        if group_filter != "none":
            new = select(new, group_has_variance(torch.tensor([s.reward for s in new.scores]), new.group_ids))
        kept = new if kept is None else concat(kept, new)
        rounds += 1
        if group_filter != "dynamic_sampling" or num_groups(kept) >= prompts_per_step or rounds > max_refill_rounds:
            return kept, seen, rounds, consumed


def shared_prefix_flops(flops: FlopModel, prompts: list, comps: list, rows: Tensor) -> float:
    """Forward FLOPs of one packed micro-batch: each distinct prompt once, its completions on top of it
    (train/forward.py's shared prefixes, tracking/ledger.py)."""
    rows = rows.tolist()
    distinct, prompt_of = distinct_prompts([prompts[i] for i in rows])
    lengths: list[list[int]] = [[] for _ in distinct]
    for i, u in zip(rows, prompt_of):
        lengths[u].append(len(comps[i]))
    return sum(flops.forward_shared_prefix(len(p), ts) for p, ts in zip(distinct, lengths))


def generation_flops(flops: FlopModel, batch: Rollouts) -> float:
    """Each distinct prompt is prefilled once per group, then every sample decodes on its own (hf.py)."""
    total = 0.0
    for g in batch.group_ids.unique().tolist():
        rows = (batch.group_ids == g).nonzero().squeeze(-1).tolist()
        prompt = len(batch.prompts[rows[0]])
        total += flops.prefill(prompt) + sum(flops.decode_steps(prompt, len(batch.completions[i].token_ids))
                                             for i in rows)
    return total


def num_groups(batch: Rollouts) -> int:
    return int(batch.group_ids.unique().numel())


def select(batch: Rollouts, keep: Tensor) -> Rollouts:
    idx = keep.nonzero().squeeze(-1).tolist()
    return Rollouts([batch.tasks[i] for i in idx], [batch.prompts[i] for i in idx],
                    [batch.completions[i] for i in idx], [batch.scores[i] for i in idx], batch.group_ids[idx])


def concat(a: Rollouts, b: Rollouts) -> Rollouts:
    offset = int(a.group_ids.max()) + 1 if len(a.group_ids) else 0  # group ids stay unique across rounds
    return Rollouts(a.tasks + b.tasks, a.prompts + b.prompts, a.completions + b.completions, a.scores + b.scores,
                    torch.cat([a.group_ids, b.group_ids + offset]))


def pad(rows: list[list[float]] | list[Tensor]) -> Tensor:
    """Right-pad ragged rows with zeros into a (B, T) float tensor."""
    width = max(1, max(len(r) for r in rows))
    out = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.float)
    return out


def split_groups(group_ids: Tensor, parts: int, *, seed: int) -> list[Tensor]:
    """Row indices of `parts` mini-batches, each made of whole groups (shuffled when there are several)."""
    groups = group_ids.unique()
    if parts > 1:
        groups = groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))]
    return [torch.isin(group_ids, g).nonzero().squeeze(-1) for g in groups.tensor_split(min(parts, len(groups)))]


def index_in(rows_of_minibatch: Tensor, rows: Tensor) -> Tensor:
    """Positions of `rows` within the mini-batch's row list (both sorted)."""
    return torch.searchsorted(rows_of_minibatch, rows)


def rollout_metrics(batch: Rollouts) -> dict[str, float]:
    """Statistics of everything sampled this step (before group filtering)."""
    if not batch.completions:
        return {"rollout/reward_mean": 0.0, "rollout/pass_rate": 0.0, "rollout/len_mean": 0.0,
                "rollout/truncated_frac": 0.0, "rollout/effective_groups_frac": 0.0, "rollout/samples": 0}
    rewards = torch.tensor([s.reward for s in batch.scores])
    effective = group_has_variance(rewards, batch.group_ids)
    return {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "rollout/pass_rate": sum(s.correct for s in batch.scores) / len(batch.scores),
        "rollout/len_mean": sum(len(x.token_ids) for x in batch.completions) / len(batch.completions),
        "rollout/truncated_frac": sum(x.finish_reason == "length" for x in batch.completions) / len(batch.completions),
        "rollout/effective_groups_frac": float(effective.float().mean()),
        "rollout/samples": len(batch.completions),
        "rollout/score_errors": sum(1 for s in batch.scores if "error" in s.info),
    }


def record_visits(history: dict, batch: Rollouts, *, step: int) -> None:
    """Per-prompt learning history: every visit's step and pass rate, first step solved, times sampled."""
    for g in batch.group_ids.unique().tolist():
        rows = (batch.group_ids == g).nonzero().squeeze(-1).tolist()
        task = batch.tasks[rows[0]]
        rate = sum(batch.scores[i].correct for i in rows) / len(rows)
        h = history.setdefault(task.id, {"id": task.id, "difficulty": task.difficulty, "visits": [],
                                         "first_solved_step": None, "times_sampled": 0})
        h["visits"].append([step, rate])
        h["times_sampled"] += len(rows)
        if rate > 0 and h["first_solved_step"] is None:
            h["first_solved_step"] = step


def write_prompt_history(ctx: RunContext, history: dict) -> None:
    tmp = ctx.run_dir / "prompts.jsonl.tmp"
    with tmp.open("w") as f:
        for h in history.values():
            f.write(json.dumps(h) + "\n")
    tmp.replace(ctx.run_dir / "prompts.jsonl")
