"""Preference optimisation: DPO, IPO, SimPO and conservative DPO as one stage over the PREFERENCE_LOSSES registry.

    posttrain run recipes/dpo-online.toml                      # pairs built from the policy's own samples
    posttrain run recipes/dpo-online.toml --set dpo.preset=simpo

Pairs come from a file (`data_path`: rows of prompt / chosen / rejected) or, without one, online: each step samples
`group_size` completions of `prompts_per_step` prompts from the current policy, scores them with the environment,
and pairs each group's best sample against its worst (a group whose rewards are all equal gives no pair).

One step: pairs -> the frozen reference's sequence logprobs (losses that need one; the reference is the policy at
the start of the stage) -> one Learner.train_step whose micro-batches keep each pair together -> log, evaluate,
checkpoint. The loss is the mean over the step's pairs, whatever the micro-batch split.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor

from posttrain.algos import PREFERENCE_LOSSES, PreferenceInputs, best_and_worst
from posttrain.config import StageConfig
from posttrain.data.preference import Pair, file_pairs
from posttrain.data.samplers import SAMPLERS
from posttrain.data.tables import data_columns_field, data_path_field
from posttrain.errors import ConfigError
from posttrain.presets import PresetKeys
from posttrain.records import SamplingParams
from posttrain.rollout.collect import (
    PromptRenderer,
    StepRollouts,
    collect,
    describe_samples,
    generation_flops,
)
from posttrain.runtime.context import RunContext
from posttrain.runtime.ledger import Measured
from posttrain.runtime.loop import StageLoop
from posttrain.runtime.services import Services
from posttrain.stages import StageResume, StageState, register_stage
from posttrain.tracking.ledger import FlopModel
from posttrain.train.learner import ForwardOut, FrozenModel, Learner, Sequences, StepResult


class DPOConfig(StageConfig, PresetKeys):
    """The preference-optimisation stage (plus the optimizer keys shared with [sft] and [rl])."""

    preset_section: ClassVar[str] = "dpo"
    preset_entry_tables: ClassVar[dict[str, str]] = {"loss": "loss_args"}

    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    preset: str | None = Field(None, description="A named loss (dpo, ipo, simpo, cdpo, orpo): a TOML file in "
                               "posttrain/presets/dpo whose keys become this section's defaults.")
    loss: str = Field("dpo", description="Preference loss (registry algos.PREFERENCE_LOSSES: dpo, cdpo, ipo, "
                      "simpo), or an import path 'pkg.module:function'.")
    loss_args: dict[str, Any] = Field(default_factory=dict, description="Hyperparameters of the loss (dpo: beta; "
                                      "simpo: beta, gamma; ...); `posttrain docs` lists each entry's.")
    steps: int = Field(100, gt=0, description="Optimizer steps (one batch of pairs each).")
    micro_batch_size: int = Field(64, gt=0, description="Sequences per forward/backward (per device; a pair is "
                                  "two, never split).")
    data_path: str | None = data_path_field("Preference pairs: rows of prompt, chosen and rejected strings",
                                            unset="pairs are built online from the policy's samples, scored by "
                                            "the environment.")
    data_columns: dict[str, str] = data_columns_field("prompt, chosen and rejected", '{chosen = "better"}')
    pairs_per_step: int = Field(32, gt=0, description="From a file: pairs per optimizer step (global).")
    prompts_per_step: int = Field(32, gt=0, description="Online: prompts sampled per step; each gives at most "
                                  "one pair.")
    group_size: int = Field(8, ge=2, description="Online: completions per prompt, from which the best and the "
                            "worst make the pair.")
    temperature: float = Field(1.0, gt=0, description="Online: sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Online: nucleus sampling.")
    max_new_tokens: int = Field(32, gt=0, description="Online: generation budget per completion.")
    sampler: str = Field("uniform", description="Online: where prompts come from (registry "
                         "data.samplers.SAMPLERS).")
    sampler_args: dict[str, Any] = Field(default_factory=dict, description="Hyperparameters of the sampler.")
    eval_every: int = Field(0, ge=0, description="Held-out evaluation every N steps (0 = only at the end).")
    log_samples: int = Field(4, ge=0, description="Online: completions per step written to samples.jsonl.")

    @model_validator(mode="after")
    def _loss_entry(self) -> DPOConfig:
        if ":" not in self.loss and self.loss not in PREFERENCE_LOSSES:
            raise ConfigError("dpo.loss", f"{self.loss!r} is not one of {', '.join(PREFERENCE_LOSSES.names())}")
        self.__dict__["loss_args"] = PREFERENCE_LOSSES.validate_args(self.loss, self.loss_args, key="dpo.loss_args")
        if ":" not in self.sampler and self.sampler not in SAMPLERS:
            raise ConfigError("dpo.sampler", f"{self.sampler!r} is not one of {', '.join(SAMPLERS.names())}")
        self.__dict__["sampler_args"] = SAMPLERS.validate_args(self.sampler, self.sampler_args,
                                                               key="dpo.sampler_args")
        return self


@dataclass(frozen=True)
class PreferenceLoss:
    """The micro-batch loss: rows 2i and 2i+1 are pair i's chosen and rejected answers (kept in one micro-batch);
    the per-pair losses are summed and divided by the step's number of pairs."""

    loss: str
    loss_args: dict[str, Any]
    ref_logps: Tensor | None  # (2P,) the reference's sequence logprobs, or None
    tokens: Tensor  # (2P,) completion tokens per row
    pairs: int

    def __call__(self, out: ForwardOut) -> tuple[Tensor, dict[str, float]]:
        seq = torch.where(out.mask.bool(), out.logprobs, torch.zeros_like(out.logprobs)).sum(-1)  # (b,)
        rows = out.rows
        if len(rows) % 2 or bool((rows[0::2] % 2 != 0).any()) or bool((rows[1::2] != rows[0::2] + 1).any()):
            raise RuntimeError(f"a preference micro-batch split a pair: rows {rows.tolist()}")
        dev = seq.device
        ref = self.ref_logps[rows].to(dev) if self.ref_logps is not None else None
        tokens = self.tokens[rows].to(dev).to(seq.dtype)
        x = PreferenceInputs(seq[0::2], seq[1::2], tokens[0::2], tokens[1::2],
                             ref[0::2] if ref is not None else None, ref[1::2] if ref is not None else None)
        per_pair, parts = PREFERENCE_LOSSES.get(self.loss)(x, **self.loss_args)
        chosen, rejected = parts["chosen_reward"], parts["rejected_reward"]
        metrics = {"chosen_reward": float(chosen.sum()), "rejected_reward": float(rejected.sum()),
                   "accuracy": float((chosen > rejected).float().sum()),
                   "chosen_logp": float(seq[0::2].detach().sum()), "rejected_logp": float(seq[1::2].detach().sum())}
        return per_pair.sum() / self.pairs, metrics


@dataclass(frozen=True)
class DPOState(StageState):
    cursor: int  # pairs read from the data file
    sampler: dict[str, Any]  # the task sampler of online pairs
    reference: dict[str, Any] | None  # the reference's weights (None: a reference-free loss)


@register_stage("dpo", DPOConfig, state=DPOState)
def run(ctx: RunContext, c: DPOConfig, resume: StageResume | None) -> None:
    parts, say = ctx.parts, ctx.services
    tok = parts.tokenizer
    loop = StageLoop(ctx, c, resume, steps=c.steps)
    learner = loop.learner
    # The reference is the policy as the stage found it (a reference-free loss such as SimPO has none).
    reference = learner.frozen_copy() if PREFERENCE_LOSSES.trait(c.loss, "needs_reference", True) else None
    env = parts.training_env(c.env_args)
    sampler = SAMPLERS.get(c.sampler)(env, parts.seed, **c.sampler_args)
    cursor = 0
    if resume:
        cursor = resume.state.cursor
        sampler.load_state_dict(resume.state.sampler)
        if reference is not None:
            reference.load_weights(resume.state.reference)
    if c.data_path:
        stream = itertools.islice(file_pairs(Path(c.data_path), tok, seed=parts.seed, chat_template=parts.chat_template,
                                             max_len=parts.max_len, columns=c.data_columns), cursor, None)
    else:
        batches = collect(parts.engine, sampler, parts.scorer.with_env(env),
                          PromptRenderer(env, tok, parts.chat_template, parts.max_len),
                          prompts_per_step=c.prompts_per_step, group_size=c.group_size, group_filter="zero_variance",
                          max_refill_rounds=0, seed=parts.seed, first_step=ctx.state.global_step,
                          heartbeat=say.heartbeat,
                          sampling=SamplingParams(temperature=c.temperature, top_p=c.top_p,
                                                  max_new_tokens=c.max_new_tokens))

    def state() -> DPOState:
        return DPOState(cursor, sampler.state_dict(), reference.state_dict() if reference is not None else None)

    for step in loop.steps():
        t_step = time.time()
        metrics: dict[str, float] = {}
        # 1. pairs: the next ones from the file, or the best and worst of each sampled group ---------------------
        if c.data_path:
            say.phase("data", f"{c.pairs_per_step} pairs from {c.data_path}")
            pairs = list(itertools.islice(stream, c.pairs_per_step))
            cursor += len(pairs)
        else:
            rollouts = next(batches)
            ctx.record_samples(rollouts.seen, c.log_samples)
            pairs, measured = online_pairs(rollouts, learner.flop_model)
            metrics.update(loop.account(measured))
        # 2-3. reference logprobs, then one update over every pair -------------------------------------------------
        if pairs:
            result, measured = train_on_pairs(say, learner, reference, pairs, c, where=f"dpo step {step + 1}")
            metrics.update(loop.account(measured))
            loop.trained(result)
        else:
            say.note(f"dpo step {step + 1}: no group had two different rewards, so no pair; no update")
            loop.trained()
        loop.publish()  # online pairs sample from the new weights
        # 4. log, evaluate, checkpoint ------------------------------------------------------------------------------
        metrics.update({"dpo/pairs": len(pairs), "time/step_s": time.time() - t_step, "train/examples_seen": cursor})
        say.status(f"loss {metrics.get('dpo/loss', float('nan')):.3f}")
        loop.end_step(metrics, state(), eval_every=c.eval_every)
    loop.end_stage(state())


def online_pairs(rollouts: StepRollouts, flops: FlopModel) -> tuple[list[Pair], Measured]:
    """The kept groups' (best, worst) samples as pairs, and the generation's work for the compute ledger."""
    seen, kept = rollouts.seen, rollouts.kept
    gen = generation_flops(flops, seen)
    measured = Measured(describe_samples(seen), flops={"generate": gen}, notes=list(rollouts.notes),
                        counters={"compute/wasted_flops": gen - generation_flops(flops, kept),
                                  "rollout/tokens": sum(len(x.token_ids) for x in seen.completions)})
    return [Pair(kept.prompts[w], list(kept.completions[w].token_ids), list(kept.completions[l].token_ids))
            for w, l in best_and_worst(kept.rewards(), kept.group_ids)], measured


def train_on_pairs(say: Services, learner: Learner, reference: FrozenModel | None, pairs: list[Pair],
                   c: DPOConfig, *, where: str) -> tuple[StepResult, Measured]:
    seqs = Sequences([p.prompt for p in pairs for _ in range(2)],
                     [answer for p in pairs for answer in (p.chosen, p.rejected)])
    ref, measured = None, Measured()
    if reference is not None:
        t0 = time.time()
        say.phase("logprobs", f"reference pass over {len(seqs)} answers")
        lps, measured.flops["ref"] = reference.logprobs(seqs)
        ref = torch.stack([lp.sum() for lp in lps])
        measured.metrics["time/ref_s"] = time.time() - t0
    say.phase("train", f"one update over {len(pairs)} pairs")
    t0 = time.time()
    loss = PreferenceLoss(c.loss, c.loss_args, ref, torch.tensor([len(x) for x in seqs.completions]), len(pairs))
    result = learner.train_step(seqs, loss, keep_together=torch.arange(len(seqs)) // 2, where=where)
    n, m = len(pairs), result.metrics
    measured.metrics.update({
        "dpo/loss": result.loss, "dpo/chosen_reward": m["chosen_reward"] / n,
        "dpo/rejected_reward": m["rejected_reward"] / n,
        "dpo/reward_margin": (m["chosen_reward"] - m["rejected_reward"]) / n,
        "dpo/accuracy": m["accuracy"] / n, "dpo/chosen_logp": m["chosen_logp"] / n,
        "dpo/rejected_logp": m["rejected_logp"] / n, "train/grad_norm": result.grad_norm, "train/lr": result.lr,
        "time/train_s": time.time() - t0})
    return result, measured
