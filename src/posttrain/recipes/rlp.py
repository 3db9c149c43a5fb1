"""RLP: reinforcement as a pretraining objective (arXiv 2510.01265). Verifier-free RL on a pretraining corpus.

    posttrain run recipes/rlp.toml                 # pretrain a base model, then RLP on the same corpus

One step, top to bottom in `run`: pick `positions_per_step` positions (one per packed sequence of the corpus, at
a seeded random offset) -> the policy writes `group_size` thoughts of up to `thought_tokens` tokens at each
(the rollout engine, sampling from the context) -> one no-grad pass over [context | thought | next tokens] gives
the thought's old logprobs and log p_θ(next tokens | context, thought); the EMA baseline scores the next tokens
without a thought -> reward = information gain (algos/rlp.py), advantage = G/(G−1)·(r − group mean) -> one
clipped-surrogate update whose mask covers the thought tokens only -> EMA update φ ← τφ + (1−τ)θ -> engine weights.

The corpus keys are the pretrain stage's (data_path, or the environment's tasks written out as statements; seq_len,
held-out loss). Metrics: rlp/info_gain (mean reward), rlp/drift_gain (log p_θ − log p_φ of the next tokens without
a thought: the part of the reward that comes from the policy having moved ahead of its EMA, not from thinking),
rlp/thought_len, rlp/ema_lag (||θ − φ|| / ||θ||), rlp/eval_loss (held-out next-token NLL) and the usual pg/*.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field, model_validator

from posttrain.algos import AGGREGATIONS, POLICY_LOSSES, PolicyLossInputs, normalisers_for
from posttrain.algos.rlp import ema_update_, information_gain, loo_advantages, relative_distance, thought_mask
from posttrain.errors import UserError
from posttrain.recipes.corpus import CorpusConfig, corpus
from posttrain.records import SamplingParams
from posttrain.runtime.context import RunContext
from posttrain.runtime.ledger import Measured
from posttrain.runtime.loop import StageLoop
from posttrain.stages import StageResume, StageState, register_stage
from posttrain.train.learner import ForwardOut, Sequences
from posttrain.train.losses import held_out_nll, pad


class RLPConfig(CorpusConfig):
    """The RLP stage (plus the optimizer and corpus keys)."""

    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    steps: int = Field(100, gt=0, description="RLP updates.")
    positions_per_step: int = Field(16, gt=0, description="Document positions per step (one per packed "
                                    "sequence of the corpus).")
    group_size: Annotated[int, Field(ge=2, description="Thoughts per position (G): the group of the "
                                     "leave-one-out baseline.")] = 8
    thought_tokens: int = Field(16, gt=0, description="Most tokens of one thought (it also ends at a stop token).")
    target_tokens: int = Field(1, gt=0, description="Next tokens the thought is judged on (the reward is the mean "
                               "information gain over them).")
    min_context: int = Field(4, gt=0, description="Fewest context tokens before a sampled position.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the thoughts (and their logprobs).")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="τ of the EMA baseline φ ← τφ + (1−τ)θ, applied "
                             "after every update (the paper's 0.999; a short CPU run may want 0.99).")
    clip_eps: float = Field(0.2, gt=0, description="PPO clip range of the surrogate on the thought tokens.")
    micro_batch_size: int = Field(64, gt=0, description="Rows per forward/backward (per device).")

    @model_validator(mode="after")
    def _fits(self) -> RLPConfig:
        if self.min_context + self.target_tokens > self.seq_len:
            raise ValueError(f"min_context ({self.min_context}) + target_tokens ({self.target_tokens}) do not fit "
                             f"in seq_len = {self.seq_len}")
        return self


@dataclass(frozen=True)
class RLPState(StageState):
    cursor: int  # packed sequences consumed
    ema: dict[str, Any]  # the EMA baseline's weights


@register_stage("rlp", RLPConfig, state=RLPState)
def run(ctx: RunContext, c: RLPConfig, resume: StageResume | None) -> None:
    parts, say = ctx.parts, ctx.services
    if parts.max_len is not None and c.seq_len + c.thought_tokens > parts.max_len:
        raise UserError(f"rlp.seq_len + rlp.thought_tokens = {c.seq_len + c.thought_tokens} exceeds the model's "
                        f"context of {parts.max_len} tokens")
    loop = StageLoop(ctx, c, resume, steps=c.steps)
    learner = loop.learner
    ema = learner.frozen_copy()  # φ starts as the policy the stage starts from
    cursor = 0
    if resume:
        ema.load_weights(resume.state.ema)
        cursor = resume.state.cursor
    stream, held_out = corpus(parts, c, cursor)
    for step in loop.steps():
        t0 = time.time()
        # 1. positions: one per packed sequence, at a seeded offset (a resumed run picks the same ones)
        say.phase("data", f"{c.positions_per_step} positions")
        docs = list(itertools.islice(stream, c.positions_per_step))
        cursor += len(docs)
        seed = parts.seed * 1_000_003 + ctx.state.global_step
        g = torch.Generator().manual_seed(seed)
        cuts = torch.randint(c.min_context, c.seq_len - c.target_tokens + 1, (len(docs),), generator=g).tolist()
        contexts = [d[:t] for d, t in zip(docs, cuts, strict=True)]
        targets = [d[t: t + c.target_tokens] for d, t in zip(docs, cuts, strict=True)]
        # 2. G thoughts per position
        say.phase("generate", f"{len(docs)} x {c.group_size} thoughts of up to {c.thought_tokens} tokens")
        prompts = [x for x in contexts for _ in range(c.group_size)]
        thoughts = parts.engine.generate(prompts, SamplingParams(temperature=c.temperature,
                                                                 max_new_tokens=c.thought_tokens, seed=seed))
        group_ids = torch.arange(len(docs)).repeat_interleave(c.group_size)
        rows = Sequences(prompts, [list(t.token_ids) + targets[int(i)] for t, i in zip(thoughts, group_ids,
                                                                                       strict=True)])
        # 3. rewards: the policy with the thought vs the EMA without it
        say.phase("logprobs", "policy [context | thought | next tokens], EMA [context | next tokens]")
        policy_lp, old_flops = learner.logprobs(rows, temperature=1.0)
        ema_lp, ema_flops = ema.logprobs(Sequences(contexts, targets))
        drift_lp, drift_flops = learner.logprobs(Sequences(contexts, targets))
        lens = torch.tensor([len(t.token_ids) for t in thoughts])
        with_thought = pad([lp[n:] for lp, n in zip(policy_lp, lens.tolist(), strict=True)])
        target_mask = pad([[1.0] * len(targets[int(i)]) for i in group_ids])
        baseline = pad(ema_lp)[group_ids]
        rewards = information_gain(with_thought, baseline, target_mask)
        advantages = loo_advantages(rewards, group_ids)
        # 4. one update through the thought tokens only
        say.phase("train", f"clipped surrogate over {int(lens.sum())} thought tokens")
        width = max(len(x) for x in rows.completions)
        mask = thought_mask(lens, width)
        old = pad(policy_lp, width) if c.temperature == 1.0 else pad(
            [list(t.logprobs) + [0.0] * c.target_tokens for t in thoughts], width)
        norm, group_tokens = normalisers_for(mask, group_ids, c.thought_tokens)
        loss = ThoughtLoss(old, advantages[:, None].expand(-1, width).contiguous(), mask, norm, group_tokens,
                           c.clip_eps)
        result = learner.train_step(rows, loss, temperature=c.temperature, where=f"rlp step {step + 1}")
        ema_update_(ema.state_dict(), learner.weights(), c.ema_decay)
        # 5. the ledger (generation, the no-grad passes, then the update), the new weights to the engine, the log
        gen = sum(learner.flop_model.prefill(len(x)) for x in contexts) + sum(
            learner.flop_model.decode_steps(len(p), len(t.token_ids)) for p, t in zip(prompts, thoughts, strict=True))
        loop.account(Measured(flops={"generate": gen, "old": old_flops + drift_flops, "ref": ema_flops}))
        loop.trained(result)
        loop.account(Measured(counters={"rlp/positions": len(docs)}))
        loop.publish()
        metrics = {"rlp/info_gain": float(rewards.mean()), "rlp/info_gain_std": float(rewards.std()),
                   "rlp/drift_gain": float(information_gain(pad(drift_lp), pad(ema_lp), pad(
                       [[1.0] * len(t) for t in targets])).mean()),
                   "rlp/thought_len": float(lens.float().mean()),
                   "rlp/ema_lag": relative_distance(ema.state_dict(), learner.weights()),
                   "pg/loss": result.loss, "pg/clip_frac": result.metrics.get("clip_frac", 0.0) / max(1, result.tokens),
                   "train/lr": result.lr, "train/grad_norm": result.grad_norm, "time/step_s": time.time() - t0}
        if loop.scheduled(c.eval_every):
            metrics["rlp/eval_loss"] = held_out_nll(learner, held_out)
        say.status(f"info gain {metrics['rlp/info_gain']:+.3f}")
        loop.end_step(metrics, RLPState(cursor, ema.state_dict()))
    ctx.write_metrics("rlp", {"rlp/eval_loss": held_out_nll(learner, held_out)})
    loop.end_stage(RLPState(cursor, ema.state_dict()))


class ThoughtLoss:
    """PPO's clipped surrogate (POLICY_LOSSES "ppo_clip") on the thought tokens, token-mean over the step's thoughts."""

    def __init__(self, old, advantages, mask, norm, group_tokens, clip_eps: float) -> None:
        self.old, self.advantages, self.mask = old, advantages, mask
        self.norm, self.group_tokens, self.clip_eps = norm, group_tokens, clip_eps

    def __call__(self, out: ForwardOut):
        rows, width, dev = out.rows, out.logprobs.shape[1], out.logprobs.device
        m = self.mask[rows, :width].to(dev)
        per_token, parts = POLICY_LOSSES.get("ppo_clip")(PolicyLossInputs(
            out.logprobs, self.old[rows, :width].to(dev), self.advantages[rows, :width].to(dev), m,
            torch.ones_like(m)), eps_low=self.clip_eps, eps_high=self.clip_eps)
        loss = AGGREGATIONS.get("token_mean")(per_token, m, norm=self.norm,
                                               group_tokens=self.group_tokens[rows].to(dev))
        return loss, {"clip_frac": float((parts["clip_frac"] * m).sum())}

