"""RL with verifiable rewards: the GRPO family as one loop over registry entries (DESIGN.md, "The RL step").

    posttrain run recipes/quickstart.toml                    # SFT warm-up, then this stage
    posttrain run recipes/quickstart.toml --set rl.preset=dapo

Which method runs is decided only by `[rl]` keys naming registry entries (advantage, policy_loss, aggregation,
kl_estimator, is_correction, group_filter, sampler) and their hyperparameter tables; presets in
posttrain/presets/rl/*.toml are sets of those keys. Nothing below branches on a method's name. Distillation is the
same loop with a [teacher]: on-policy distillation is the `reverse_kl` advantage (preset opd), KDRL a teacher KL
term beside GRPO's (teacher_kl_coef; preset kdrl).

One step, top to bottom in `run`: next(batches) (sample prompts, generate, score, filter) -> rl_batch (rewards,
reference / teacher / old logprobs, IS weights, advantages through the credit assignment over an episode's
turns) -> update (epochs x mini-batches of Learner.train_step) -> controllers -> engine.update_weights ->
end_step (log, evaluate, reset the reference, checkpoint).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from posttrain.algos import (
    AGGREGATIONS,
    IS_CORRECTIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    AdvantageInputs,
    Normalisers,
    PolicyLossInputs,
    adapt_in_band,
    distill_row_mask,
    effective_sample_size,
    mismatch_metrics,
    normalisers_for,
    overlong_penalty,
    should_reset_reference,
)
from posttrain.algos.advantages import estimator
from posttrain.algos.credit import CREDIT, CreditInputs, turn_index
from posttrain.algos.forking import top_entropy_mask
from posttrain.data.samplers import SAMPLERS, PromptHistory, TaskSampler
from posttrain.recipes.rl_config import RLConfig
from posttrain.records import SamplingParams
from posttrain.rollout.collect import (
    PromptRenderer,
    RolloutBatch,
    StepRollouts,
    collect,
    describe_samples,
    generation_flops,
    per_source,
)
from posttrain.rollout.producer import staleness
from posttrain.runtime.context import RunContext
from posttrain.runtime.ledger import Measured
from posttrain.runtime.loop import StageLoop
from posttrain.stages import StageResume, StageState, register_stage
from posttrain.tracking.ledger import FlopModel
from posttrain.train.learner import ForwardOut, FrozenModel, Learner, Sequences, StepResult
from posttrain.train.losses import pad
from posttrain.train.protocol import LearnerLike


@dataclass
class RLState:
    """What the RL stage carries from step to step besides the learner (checkpointed)."""

    loss_args: dict[str, Any]  # the policy loss's hyperparameters, as the controllers have adapted them
    # The entropy bonus as the controller has adapted it; None only in a checkpoint written before the controller
    # could adapt it, which the stage reads as rl.entropy_coef.
    entropy_coef: float | None = None
    last_reset: int = 0  # stage step of the last reference reset
    val_history: list[tuple[int, float]] = field(default_factory=list)  # (stage step, held-out mean@n)


@dataclass(frozen=True)
class RLBatch:
    """One step's kept samples as tensors, B x T, ready for the update."""

    seqs: Sequences
    group_ids: Tensor  # (B,)
    mask: Tensor  # (B, T) 1 on tokens that train
    sampler_logprobs: Tensor  # (B, T) the engine's logprobs of its samples
    old_logprobs: Tensor  # (B, T) π_θold: the learner's recomputation, or the sampler's
    ref_logprobs: Tensor | None  # (B, T) π_ref, when a KL term exists
    is_weights: Tensor  # (B, T) detached sampler-vs-trainer weights
    advantages: Tensor  # (B, T)
    teacher_logprobs: Tensor | None = None  # (B, T) the teacher's logprobs of the samples, when a stage distils
    teacher_rows: Tensor | None = None  # (B,) 1 on the samples that carry the teacher KL term (teacher_kl_mask)


@dataclass(frozen=True)
class RLSaved(StageState):
    """What an RL checkpoint holds besides the learner."""

    rl: RLState
    sampler: dict[str, Any]  # the task sampler as of the last step trained (an asynchronous producer is ahead)
    reference: dict[str, Any] | None  # the reference's weights, when a KL term exists

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "rl": asdict(self.rl)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RLSaved:
        saved = super().from_dict(data)
        return replace(saved, rl=RLState(**saved.rl))


class UpdateAt(NamedTuple):
    step: int  # the stage step (0-based)
    seed: int  # of the mini-batch split


class StepModels(NamedTuple):
    """The models an RL step reads logprobs from, and where π_θold comes from."""

    learner: LearnerLike
    reference: FrozenModel | None  # π_ref, when a KL term exists
    teacher: FrozenModel | None  # when the stage distils (a teacher advantage or the KDRL term)
    recompute_old: bool  # π_θold is the learner's recomputation, not the sampler's logprobs


@register_stage("rl", RLConfig, state=RLSaved)
def run(ctx: RunContext, c: RLConfig, resume: StageResume | None) -> None:
    parts, say = ctx.parts, ctx.services
    env = parts.training_env(c.env_args)
    sampler = SAMPLERS.get(c.sampler)(env, parts.seed, **c.sampler_args)
    loop = StageLoop(ctx, c, resume, steps=c.steps,
                     on_saved=lambda saved, done: write_prompt_history(parts.run_dir, saved.sampler, sampler, done))
    learner = loop.learner
    # The reference exists only when a KL term does; it starts as the policy at the start of the stage.
    reference = learner.frozen_copy() if c.kl_coef > 0 else None
    models = StepModels(learner, reference, parts.teacher if c.teacher_keys() else None,
                        recompute_old=(c.recompute_old_logprobs if c.recompute_old_logprobs is not None
                                       else parts.foreign_sampler))
    state = RLState(loss_args=dict(c.policy_loss_args), entropy_coef=c.entropy_coef)
    if resume:
        state = resume.state.rl
        if state.entropy_coef is None:
            state.entropy_coef = c.entropy_coef
        sampler.load_state_dict(resume.state.sampler)
        if reference is not None:
            reference.load_weights(resume.state.reference)
    sampler_state = copy.deepcopy(sampler.state_dict())  # before a producer thread starts moving it

    def saved() -> RLSaved:
        return RLSaved(state, sampler_state, reference.state_dict() if reference is not None else None)

    # In step with training, or (rollout.max_staleness = k > 0) up to k steps ahead of it (rollout/producer.py).
    batches = ctx.rollouts(lambda engine: collect(
        engine, sampler, parts.scorer.with_env(env),
        PromptRenderer(env, parts.tokenizer, parts.chat_template, parts.max_len),
        prompts_per_step=c.prompts_per_step, group_size=c.group_size, group_filter=c.group_filter,
        max_refill_rounds=c.max_refill_rounds, seed=parts.seed, first_step=ctx.state.global_step,
        sampling=SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                max_new_tokens=c.max_new_tokens), heartbeat=say.heartbeat))
    info_keys = getattr(parts.env, "info_metrics", ())
    try:
        if not resume and c.eval_every:  # the curve's first point: the policy RL starts from, at zero RL compute
            loop.account(Measured(counters={"compute/rl_flops": 0.0}))
            loop.evaluate("rl-step0")
        for step in loop.steps():
            version, t_step = ctx.state.global_step, time.time()
            # 1-3. pick prompts, sample groups, score, filter groups ----------------------------------------------
            rollouts = next(batches)
            ctx.record_samples(rollouts.seen, c.log_samples)
            t_generate = time.time() - t_step
            measured = rollout_metrics(rollouts, learner.flop_model, info_keys, version, parts.max_staleness)
            metrics = loop.account(measured)
            metrics.update({"time/generate_s": t_generate,
                            "perf/gen_tokens_per_s": measured.counters["rollout/tokens"] / max(t_generate, 1e-9),
                            "time/score_s": rollouts.score_s})  # the verifier's part of time/generate_s
            results: list[tuple[StepResult, Tensor]] = []
            if len(rollouts.kept):
                # 4-5. rewards, reference / old logprobs, IS weights, advantages ------------------------------------
                t0 = time.time()
                say.phase("logprobs", "reference / old-policy forward passes")
                batch, measured = rl_batch(rollouts.kept, c, models, version)
                metrics.update(loop.account(measured), **{"time/logprob_s": time.time() - t0})
                # 6. update: epochs x mini-batches of whole groups, each one Learner.train_step ------------------
                t0 = time.time()
                say.phase("train", f"{c.epochs} epoch(s) x {c.mini_batches} mini-batch(es) over "
                          f"{len(batch.seqs)} completions")
                results = update(learner, batch, c, state,
                                 UpdateAt(step, seed=parts.seed * 1_000_003 + version))
                metrics.update(train_metrics(results, batch, c, state, t_train=time.time() - t0))
                if c.teacher_kl_coef:
                    metrics["distill/coef"] = c.teacher_coef(step)  # KDRL's annealed β
            loop.trained(*(r for r, _ in results))
            # 7. controllers between steps ---------------------------------------------------------------------
            if c.entropy_target is not None and "pg/entropy" in metrics:  # measured only on a step that trained
                loop.account(adapt_to_entropy(state, c, metrics["pg/entropy"]))
            # 8. the engines sample from the new weights; log, evaluate, reset the reference, checkpoint ----------
            t0 = time.time()  # a sharded learner gathers its weights here (train/learner_group.py)
            loop.publish()
            batches.post_weights(learner.weights(), ctx.state.global_step)
            metrics["time/weight_sync_s"] = time.time() - t0
            sampler_state = rollouts.sampler_state
            metrics["time/step_s"] = time.time() - t_step
            say.status(f"reward {metrics['rollout/reward_mean']:.3f}")
            evaluation = loop.log(metrics, eval_every=c.eval_every)
            if evaluation is not None:
                state.val_history.append((loop.stage_step, evaluation.get("mean@n", {}).get(
                    "mean", evaluation["greedy_acc"])))
            reset_reference(loop, c, state, reference, kl=metrics.get("kl/value"))
            loop.checkpoint(saved())
    finally:
        batches.close()
    loop.end_stage(saved())


# ---------------------------------------------------------------------------------------------------------------
# The step's parts, in the order the loop above calls them. Each returns what it measured (runtime/ledger.py).


def rollout_metrics(rollouts: StepRollouts, flops: FlopModel, info_keys: Iterable[str], version: int,
                    max_staleness: int) -> Measured:
    """The generation work (all of it, and the part spent on filtered-out groups) and a description of the samples
    of the policy at `version`."""
    seen, kept = rollouts.seen, rollouts.kept
    gen_flops = generation_flops(flops, seen)
    tokens = sum(len(x.token_ids) for x in seen.completions)
    metrics = {**describe_samples(seen, info_keys), **per_source(seen), **rollouts.sampler_metrics}
    if seen.completions:  # policy versions between sampler and learner: 0 in step, at most max_staleness ahead
        lag = staleness(seen.completions, version)
        if max(lag) > max_staleness or min(lag) < 0:
            raise RuntimeError(f"rl step {version + 1}: samples of policy versions "
                               f"{sorted({c.policy_version for c in seen.completions})} trained at version "
                               f"{version}, outside rollout.max_staleness = {max_staleness}")
        metrics.update({"rollout/staleness_mean": sum(lag) / len(lag), "rollout/staleness_max": max(lag)})
    metrics.update({"rollout/refill_rounds": rollouts.rounds - 1, "rollout/kept_samples": len(kept)})
    return Measured(metrics, flops={"generate": gen_flops}, notes=list(rollouts.notes),
                    counters={"compute/wasted_flops": gen_flops - generation_flops(flops, kept),
                              "rollout/tokens": tokens})


def rl_batch(kept: RolloutBatch, c: RLConfig, models: StepModels, version: int) -> tuple[RLBatch, Measured]:
    """Masks, shaped rewards, the reference and old-policy logprobs this configuration needs, IS weights and
    advantages, for the samples that train (sampled at policy `version`)."""
    seqs = Sequences(kept.prompts, [list(x.token_ids) for x in kept.completions])
    mask = train_mask(kept.completions, mask_truncated=c.mask_truncated)
    sampler_lp = pad([list(x.logprobs) for x in kept.completions])  # (B, T)
    rewards = kept.rewards()
    if c.overlong_cache > 0:
        lengths = torch.tensor([len(x) for x in seqs.completions])
        rewards = rewards + overlong_penalty(lengths, max_len=c.max_new_tokens, cache=c.overlong_cache)
    out = Measured()
    ref_lp = token_rewards = teacher_lp = teacher_rows = None
    if models.teacher is not None:  # the teacher scores the same tokens (distillation)
        t0 = time.time()
        teacher, out.flops["teacher"] = models.teacher.logprobs(seqs, temperature=c.temperature)
        teacher_lp = pad(teacher)
        teacher_rows = distill_row_mask(torch.tensor([s.correct for s in kept.scores]), c.teacher_kl_mask)
        valid = mask.bool()
        out.metrics.update({"time/teacher_s": time.time() - t0,  # k1 on the samples: the reverse KL OPD minimises
                            "distill/reverse_kl": float((sampler_lp - teacher_lp)[valid].mean()) if valid.any()
                            else 0.0, "distill/masked_frac": 1 - float(teacher_rows.mean())})
    if models.reference is not None:
        ref, out.flops["ref"] = models.reference.logprobs(seqs, temperature=c.temperature)
        ref_lp = pad(ref)
        if c.kl_placement == "reward":  # -beta * KL_t of the sampling policy to the reference, per token
            token_rewards = -c.kl_coef * KL_ESTIMATORS.get(c.kl_estimator)(sampler_lp, ref_lp) * mask
    if models.recompute_old:
        old, out.flops["old"] = models.learner.logprobs(seqs, temperature=c.temperature)
        old_lp = pad(old)
        out.metrics.update(mismatch_metrics(old_lp, sampler_lp, mask))
    else:  # the engine's logprobs: the learner's own only for fp32 shared weights (tests/rollout/test_engine.py)
        old_lp = sampler_lp
        if c.mismatch_check_every:  # ... so how far they are from the learner's is measured on a few rows
            rows = [i for i in range(len(seqs.prompts)) if (i + version) % c.mismatch_check_every == 0]
            if rows:
                checked, out.flops["mismatch"] = models.learner.logprobs(
                    Sequences([seqs.prompts[i] for i in rows], [seqs.completions[i] for i in rows]),
                    temperature=c.temperature)
                checked_lp = pad(checked)  # (len(rows), T') with T' <= T: the rows' own longest completion
                width = checked_lp.shape[1]
                out.metrics.update(mismatch_metrics(checked_lp, sampler_lp[rows][:, :width], mask[rows][:, :width]),
                                   **{"is/mismatch_rows": len(rows)})
    is_weights = IS_CORRECTIONS.get(c.is_correction)(old_lp, sampler_lp, mask, cap=c.is_cap)
    # The advantage estimator, through the credit assignment over an episode's turns (algos/credit.py).
    inputs = AdvantageInputs(rewards, kept.group_ids, mask, token_rewards=token_rewards, logprobs=sampler_lp,
                             teacher_logprobs=teacher_lp)
    advantages = CREDIT.get(c.credit)(
        CreditInputs(inputs, [s.info.get("turn_rewards", [s.reward]) for s in kept.scores],
                     turn_index([x.policy_mask for x in kept.completions], [len(x) for x in seqs.completions],
                                mask.shape[1])),
        estimator(c.advantage, **c.advantage_args), **c.credit_args)
    valid = mask.bool()
    out.metrics.update({"is/weight_max": float((is_weights * mask).max()),
                        "is/ess": float(effective_sample_size(is_weights, mask)),
                        "rollout/adv_abs_mean": float(advantages[valid].abs().mean()) if valid.any() else 0.0})
    batch = RLBatch(seqs, kept.group_ids, mask, sampler_lp, old_lp, ref_lp, is_weights, advantages, teacher_lp,
                    teacher_rows)
    return batch, out


@dataclass(frozen=True)
class RLLoss:
    """The per-micro-batch loss the Learner calls: policy loss (+ KL term) (- entropy bonus), aggregated with the
    mini-batch's global normalisers. Composed from registry names, so it pickles (a Ray learner can take it)."""

    batch: RLBatch
    norm: Normalisers
    group_tokens: Tensor  # (B,) valid tokens of each row's group within the mini-batch
    policy_loss: str
    loss_args: dict[str, Any]
    aggregation: str
    kl_estimator: str
    kl_coef_in_loss: float
    entropy_coef: float
    teacher_kl_estimator: str = "k2"
    teacher_kl_coef: float = 0.0  # β of the KDRL term at this step (0: none)
    forking_fraction: float = 1.0  # train the policy gradient on this top fraction of tokens by entropy

    def __call__(self, out: ForwardOut) -> tuple[Tensor, dict[str, float]]:
        b, rows, width = self.batch, out.rows, out.logprobs.shape[1]
        dev = out.logprobs.device  # rollout tensors live on the CPU; the learner's on the model's device

        def take(t: Tensor) -> Tensor:
            return t[rows, :width].to(dev)

        m = take(b.mask)
        per_token, parts = POLICY_LOSSES.get(self.policy_loss)(
            PolicyLossInputs(out.logprobs, take(b.old_logprobs), take(b.advantages), m, take(b.is_weights)),
            **self.loss_args)
        metrics = {"clip_frac": float((parts["clip_frac"] * m).sum()), "ratio": float((parts["ratio"] * m).sum())}
        if self.forking_fraction < 1 and out.entropy is not None:
            forks = top_entropy_mask(out.entropy, m, self.forking_fraction)
            per_token = per_token * forks
            metrics["forking_tokens"] = float(forks.sum())
            metrics["forking_entropy"] = float((out.entropy.detach() * forks).sum())
        if b.ref_logprobs is not None:
            kl = KL_ESTIMATORS.get(self.kl_estimator)(out.logprobs, take(b.ref_logprobs))
            per_token = per_token + self.kl_coef_in_loss * kl
            metrics["kl"] = float((kl.detach() * m).sum())
        if self.teacher_kl_coef and b.teacher_logprobs is not None:  # KDRL: + β KL(π_θ || π_T) on chosen rows
            teacher_kl = KL_ESTIMATORS.get(self.teacher_kl_estimator)(out.logprobs, take(b.teacher_logprobs))
            teacher_kl = teacher_kl * b.teacher_rows[rows].to(dev)[:, None]
            per_token = per_token + self.teacher_kl_coef * teacher_kl
            metrics["teacher_kl"] = float((teacher_kl.detach() * m).sum())
        if out.entropy is not None:
            if self.entropy_coef:
                per_token = per_token - self.entropy_coef * out.entropy
            metrics["entropy"] = float((out.entropy.detach() * m).sum())
        loss = AGGREGATIONS.get(self.aggregation)(per_token, m, norm=self.norm,
                                                  group_tokens=self.group_tokens[rows].to(dev))
        return loss, metrics


def update(learner: Learner, batch: RLBatch, c: RLConfig, state: RLState,
           at: UpdateAt) -> list[tuple[StepResult, Tensor]]:
    """epochs x mini-batches of whole groups, one optimizer update each; global normalisers per mini-batch.
    -> (result, rows forwarded) per update."""
    # A sample whose advantage is exactly 0 contributes exactly 0 to every policy loss and its gradient, so
    # unless a KL-in-loss or entropy term gives it one, or the teacher term covers it, its forward/backward is
    # skipped. The normalisers still count its tokens, so the loss and the update are unchanged (up to float
    # summation order).
    teacher_coef = c.teacher_coef(at.step)  # KDRL's annealed β (0 without a teacher term)
    per_sample_terms = state.entropy_coef != 0 or (batch.ref_logprobs is not None and c.kl_placement == "loss")
    zero = (batch.advantages * batch.mask == 0).all(-1)
    if teacher_coef != 0 and batch.teacher_rows is not None:  # KDRL's mask may leave a sample without the term
        zero = zero & (batch.teacher_rows == 0)
    skippable = zero if c.skip_zero_advantage and not per_sample_terms else torch.zeros_like(zero)
    results = []
    for epoch in range(c.epochs):
        for rows in split_groups(batch.group_ids, c.mini_batches, seed=at.seed + epoch):
            norm, group_tokens = normalisers_for(batch.mask[rows], batch.group_ids[rows], c.max_new_tokens)
            tokens = torch.zeros(len(batch.seqs), dtype=group_tokens.dtype).index_copy_(0, rows, group_tokens)
            loss = RLLoss(batch, norm, tokens, c.policy_loss, state.loss_args, c.aggregation, c.kl_estimator,
                          c.kl_coef if c.kl_placement == "loss" else 0.0, state.entropy_coef, c.teacher_kl_estimator,
                          teacher_coef, c.forking_fraction)
            trained = rows[~skippable[rows]]
            results.append((learner.train_step(batch.seqs, loss, rows=trained, temperature=c.temperature,
                                               with_entropy=True, where=f"rl step {at.step + 1}"), trained))
    return results


def train_metrics(results: list[tuple[StepResult, Tensor]], batch: RLBatch, c: RLConfig,
                  state: RLState, *, t_train: float) -> dict[str, float]:
    sums = {k: sum(r.metrics.get(k, 0.0) for r, _ in results)
            for k in ("clip_frac", "ratio", "entropy", "kl", "teacher_kl", "forking_tokens", "forking_entropy")}
    trained_tokens = sum(r.tokens for r, _ in results)
    denom = max(1, trained_tokens)  # pg/* and kl/* are means over the tokens that trained
    trained = [int(i) for _, rows in results for i in rows]
    seqs = batch.seqs
    return {
        "pg/loss": sum(r.loss for r, _ in results) / len(results),
        "train/grad_norm": sum(r.grad_norm for r, _ in results) / len(results),
        "train/lr": results[-1][0].lr, "train/updates": len(results),
        "train/skipped_frac": 1 - len(trained) / max(1, len(seqs) * c.epochs),
        # means over the tokens that trained: absent (not 0) on a step where none did, e.g. every group skipped
        **({"pg/clip_frac": sums["clip_frac"] / denom, "pg/ratio_mean": sums["ratio"] / denom,
            "pg/entropy": sums["entropy"] / denom, "kl/value": sums["kl"] / denom,
            **({"distill/teacher_kl": sums["teacher_kl"] / denom} if c.teacher_kl_coef else {}),
            **({"pg/forking_frac": sums["forking_tokens"] / denom,
                "pg/forking_entropy": sums["forking_entropy"] / max(1.0, sums["forking_tokens"])}
               if c.forking_fraction < 1 else {})} if trained_tokens
           else {}),
        **{f"pg/{k}": v for k, v in state.loss_args.items() if isinstance(v, float)},
        **({"pg/entropy_coef": state.entropy_coef} if c.entropy_adapt_arg == ENTROPY_COEF else {}),
        "time/train_s": t_train,
        "perf/train_tokens_per_s": sum(len(seqs.prompts[i]) + len(seqs.completions[i]) for i in trained)
        / max(t_train, 1e-9),
    }


ENTROPY_COEF = "entropy_coef"  # rl.entropy_adapt_arg naming the entropy bonus instead of a loss hyperparameter


def adapt_to_entropy(state: RLState, c: RLConfig, entropy: float) -> Measured:
    """ProRL-style band controller on `entropy_adapt_arg`: a policy-loss hyperparameter (eps_high: Clip-Higher as
    a feedback loop), or the entropy bonus itself (entropy_coef: an adaptive entropy coefficient) -> a note when
    it moved."""
    name = c.entropy_adapt_arg
    old = state.entropy_coef if name == ENTROPY_COEF else state.loss_args[name]
    new = adapt_in_band(old, entropy, target_low=c.entropy_target[0], target_high=c.entropy_target[1],
                        step_size=c.entropy_adapt_step, lo=c.entropy_adapt_bounds[0], hi=c.entropy_adapt_bounds[1])
    if new == old:
        return Measured()
    if name == ENTROPY_COEF:
        state.entropy_coef = new
    else:
        state.loss_args[name] = new
    return Measured(notes=[f"entropy {entropy:.3f} outside {list(c.entropy_target)}: {name} {old:.3f} -> {new:.3f}"])


def reset_reference(loop: StageLoop, c: RLConfig, state: RLState, reference: FrozenModel | None, *,
                    kl: float | None) -> None:
    """Reset the reference to the current policy when its schedule, the held-out plateau or the step's KL to it
    (`kl`, None when not measured) says so."""
    step = loop.stage_step
    if reference is None or not should_reset_reference(step, state.last_reset, state.val_history,
                                                       every=c.ref_reset_every, patience=c.ref_reset_patience,
                                                       kl=kl, max_kl=c.ref_reset_kl):
        return
    reference.load_weights(loop.learner.weights())
    state.last_reset = step
    if c.ref_reset_optimizer:
        loop.learner.reset_optimizer()
    loop.account(Measured(notes=[f"rl step {step}: reference policy reset to the current policy"
                                 + (" (optimizer state cleared)" if c.ref_reset_optimizer else "")]))
    loop.ctx.write_metrics("rl", {"ctrl/ref_reset": 1})


# ---------------------------------------------------------------------------------------------------------------
# Small helpers.


def train_mask(completions: list, *, mask_truncated: bool = False) -> Tensor:
    """(B, T) 1 on the tokens that train: every completion token, or only a multi-turn episode's policy tokens
    (its environment tokens never train); with mask_truncated, none of a completion cut at max_new_tokens."""
    mask = pad([list(x.policy_mask) if x.policy_mask is not None else [1.0] * len(x.token_ids)
                for x in completions])
    if mask_truncated:
        mask = mask * torch.tensor([x.finish_reason != "length" for x in completions]).float()[:, None]
    return mask


def split_groups(group_ids: Tensor, parts: int, *, seed: int) -> list[Tensor]:
    """Row indices of `parts` mini-batches, each made of whole groups (shuffled when there are several)."""
    groups = group_ids.unique()
    if parts > 1:
        groups = groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))]
    return [torch.isin(group_ids, g).nonzero().squeeze(-1) for g in groups.tensor_split(min(parts, len(groups)))]


def write_prompt_history(run_dir: Path, sampler_state: dict[str, Any], sampler: TaskSampler, done: bool) -> None:
    """prompts.jsonl beside each checkpoint: from the saved sampler state (the built-in samplers' layout, as of
    the last step trained), or at the stage's end from a sampler of another layout."""
    if "history" in sampler_state:
        history = PromptHistory()
        history.load_state_dict(sampler_state["history"])
    elif done:
        history = sampler.history
    else:
        return
    tmp = run_dir / "prompts.jsonl.tmp"
    with tmp.open("w") as f:
        for h in history.rows():
            f.write(json.dumps(h) + "\n")
    tmp.replace(run_dir / "prompts.jsonl")
