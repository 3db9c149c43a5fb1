"""Pretraining: next-token prediction on a text corpus, packed into fixed-length sequences.

    posttrain run recipes/pretrain-tiny.toml                     # a base model from random init, on CPU
    posttrain run recipes/quickstart.toml --set model.path=runs/pretrain-tiny/final --set name=qs-on-my-base

Documents come from a local file (`data_path`: a .txt file with one document per line, or a .jsonl file of
{"text": ...}) or, by default, from the run's environment: every training task written out as a plain statement,
question then solution ("12+34=46"). Each document is tokenized as raw text and followed by EOS; the token stream
is cut into sequences of `seq_len` tokens (packing: no padding, every token a target except each sequence's first).
The token budget sets the number of steps. A held-out loss on sequences packed from the environment's eval split
(or the file's last documents) is logged as pretrain/eval_loss every `eval_every` steps.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Literal

from pydantic import Field

from posttrain.errors import UserError
from posttrain.recipes.corpus import CorpusConfig, as_sequences, corpus
from posttrain.runtime.context import RunContext
from posttrain.runtime.loop import StageLoop
from posttrain.stages import Cursor, StageResume, register_stage
from posttrain.train.losses import SFTLoss, held_out_nll


class PretrainConfig(CorpusConfig):
    """The pretraining stage (plus the optimizer keys shared with the other stages)."""

    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    schedule: Literal["constant", "cosine", "linear"] = Field("cosine", description="Decay after warm-up.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps from 0 to lr.")
    tokens: int = Field(1_000_000, gt=0, description="Token budget; steps = tokens // (batch_size * seq_len).")
    batch_size: int = Field(32, gt=0, description="Packed sequences per optimizer step (global).")
    micro_batch_size: int = Field(32, gt=0, description="Sequences per forward/backward (per device).")

    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))


@register_stage("pretrain", PretrainConfig, state=Cursor)
def run(ctx: RunContext, c: PretrainConfig, resume: StageResume | None) -> None:
    parts, say = ctx.parts, ctx.services
    if parts.max_len is not None and c.seq_len > parts.max_len:
        raise UserError(f"pretrain.seq_len = {c.seq_len} exceeds the model's context of {parts.max_len} tokens")
    loop = StageLoop(ctx, c, resume, steps=c.steps())
    cursor = resume.state.cursor if resume else 0
    stream, held_out = corpus(parts, c, cursor)
    for step in loop.steps():
        t0 = time.time()
        say.phase("data", f"{c.batch_size} packed sequences of {c.seq_len} tokens")
        batch = list(itertools.islice(stream, c.batch_size))
        cursor += len(batch)
        say.phase("train", f"forward/backward over {len(batch)} x {c.seq_len} tokens")
        result = loop.learner.train_step(as_sequences(batch), SFTLoss(len(batch) * (c.seq_len - 1)),
                                         where=f"pretrain step {step + 1}")
        loop.trained(result)
        metrics = {"pretrain/loss": result.loss, "pretrain/ppl": math.exp(min(result.loss, 50.0)),
                   "train/lr": result.lr, "train/grad_norm": result.grad_norm, "time/step_s": time.time() - t0}
        if loop.scheduled(c.eval_every):
            metrics["pretrain/eval_loss"] = held_out_nll(loop.learner, held_out)
        say.status(f"loss {result.loss:.3f}")
        loop.end_step(metrics, Cursor(cursor))
    ctx.write_metrics("pretrain", {"pretrain/eval_loss": held_out_nll(loop.learner, held_out)})
    loop.end_stage(Cursor(cursor))
