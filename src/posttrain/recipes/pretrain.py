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
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config import StageConfig
from posttrain.data.jsonl import json_objects
from posttrain.errors import UserError
from posttrain.recipes.sft import SFTLoss
from posttrain.runtime.context import RunContext
from posttrain.runtime.loop import StageLoop
from posttrain.stages import Cursor, StageResume, register_stage
from posttrain.train.learner import Sequences

HELD_OUT_DOCS = 200  # documents of a file kept out of training for the held-out loss


class CorpusConfig(StageConfig):
    """The keys of a stage that reads a pretraining corpus (pretrain, rlp)."""

    seq_len: int = Field(128, gt=1, description="Tokens per packed sequence (at most the model's context).")
    data_path: str | None = Field(None, description="A .txt file (one document per line) or a .jsonl file of "
                                  "{\"text\": ...}; unset: the environment's training tasks as plain statements.")
    eval_every: int = Field(0, ge=0, description="Held-out loss every N steps (0 = only at the end).")
    eval_sequences: int = Field(32, gt=0, description="Packed sequences in the held-out loss.")
    reasoning_fraction: float = Field(0.0, ge=0, le=1, description="Of the environment corpus: the fraction of "
                                      "documents written as reasoning traces, i.e. by the environment built with "
                                      "env_args + reasoning_args (arithmetic: worked column-by-column solutions); "
                                      "the rest are plain statements ('12+34=46'). Front-loading experiments.")
    reasoning_args: dict[str, Any] = Field(default_factory=lambda: {"worked": True}, description="Environment "
                                           "arguments that make its solutions reasoning traces.")
    distractor_fraction: float = Field(0.0, ge=0, le=1, description="Of the environment corpus: the fraction of "
                                       "documents that are distractor text (a statement's characters shuffled: "
                                       "the same symbols, no arithmetic).")

    @model_validator(mode="after")
    def _corpus_mix(self) -> CorpusConfig:
        if self.data_path and (self.reasoning_fraction or self.distractor_fraction):
            raise ValueError("reasoning_fraction and distractor_fraction mix the environment corpus; with "
                             "data_path the file is the corpus")
        if self.reasoning_fraction + self.distractor_fraction > 1:
            raise ValueError(f"reasoning_fraction + distractor_fraction = "
                             f"{self.reasoning_fraction + self.distractor_fraction} > 1")
        return self


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


def file_documents(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"pretrain.data_path={str(path)!r}: file not found")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, row in json_objects(path):
            if not isinstance(row.get("text"), str):
                raise UserError(f"{path}:{lineno}: expected a string 'text'; keys: {sorted(row)}")
            docs.append(row["text"])
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
        docs = [line for line in text.splitlines() if line.strip()]
    if len(docs) < 2:
        raise UserError(f"{path}: needs at least 2 documents (one per line), found {len(docs)}")
    return docs


def env_documents(env, split: str, seed: int) -> Iterator[str]:
    """The environment's tasks as plain statements, epoch after epoch."""
    for epoch in itertools.count():
        empty = True
        for task in env.tasks(split, seed + epoch):
            empty = False
            yield f"{task.question}{task.solution}"
        if empty:
            raise UserError(f"environment {env.name!r} yields no {split} tasks to pretrain on")


def mixed_documents(plain: Iterator[str], reasoning: Iterator[str], *, reasoning_fraction: float,
                    distractor_fraction: float, seed: int) -> Iterator[str]:
    """Each document, by a seeded draw: a distractor (a plain document's characters shuffled), a reasoning trace
    (the next of `reasoning`), or the next plain statement."""
    rng = random.Random(seed)
    for doc in plain:
        u = rng.random()
        if u < distractor_fraction:
            chars = list(doc)
            rng.shuffle(chars)
            yield "".join(chars)
        elif u < distractor_fraction + reasoning_fraction:
            yield next(reasoning)
        else:
            yield doc


def pack_tokens(docs: Iterable[str], tokenizer, seq_len: int) -> Iterator[list[int]]:
    """Documents -> token ids, each followed by EOS, concatenated and cut into seq_len-token sequences."""
    buffer: list[int] = []
    for doc in docs:
        buffer += tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]


def as_sequences(packed: list[list[int]]) -> Sequences:
    """Each packed sequence's first token is context; every later token is a target."""
    return Sequences([s[:1] for s in packed], [s[1:] for s in packed])


def corpus(ctx: RunContext, c: CorpusConfig, cursor: int) -> tuple[Iterator[list[int]], Sequences]:
    """(the training stream of packed sequences from the `cursor`-th on, the held-out sequences)."""
    if c.data_path:
        docs = file_documents(Path(c.data_path))
        train_docs: Iterable[str] = itertools.chain.from_iterable(itertools.repeat(docs[:-HELD_OUT_DOCS] or docs))
        held_docs: Iterable[str] = itertools.cycle(docs[-HELD_OUT_DOCS:])
    else:
        train_docs, held_docs = env_documents(ctx.training_env(c.env_args), "train", ctx.seed), env_documents(
            ctx.env, "eval", 0)
        if c.reasoning_fraction or c.distractor_fraction:
            traces = env_documents(ctx.training_env({**c.env_args, **c.reasoning_args}), "train", ctx.seed + 1)
            train_docs = mixed_documents(train_docs, traces, reasoning_fraction=c.reasoning_fraction,
                                         distractor_fraction=c.distractor_fraction, seed=ctx.seed)
    stream = itertools.islice(pack_tokens(train_docs, ctx.tokenizer, c.seq_len), cursor, None)
    held_out = list(itertools.islice(pack_tokens(held_docs, ctx.tokenizer, c.seq_len), c.eval_sequences))
    return stream, as_sequences(held_out)


def held_out_nll(learner, held_out: Sequences) -> float:
    """Mean next-token NLL on held-out sequences: a measurement, not training compute (not in the ledger)."""
    lp, _ = learner.logprobs(held_out)
    return -float(sum(x.sum() for x in lp)) / sum(len(x) for x in lp)


@register_stage("pretrain", PretrainConfig, state=Cursor)
def run(ctx: RunContext, c: PretrainConfig, resume: StageResume | None) -> None:
    if ctx.max_len is not None and c.seq_len > ctx.max_len:
        raise UserError(f"pretrain.seq_len = {c.seq_len} exceeds the model's context of {ctx.max_len} tokens")
    loop = StageLoop(ctx, c, resume, steps=c.steps())
    cursor = resume.state.cursor if resume else 0
    stream, held_out = corpus(ctx, c, cursor)
    for step in loop.steps():
        t0 = time.time()
        ctx.phase("data", f"{c.batch_size} packed sequences of {c.seq_len} tokens")
        batch = list(itertools.islice(stream, c.batch_size))
        cursor += len(batch)
        ctx.phase("train", f"forward/backward over {len(batch)} x {c.seq_len} tokens")
        result = loop.learner.train_step(as_sequences(batch), SFTLoss(len(batch) * (c.seq_len - 1)),
                                         where=f"pretrain step {step + 1}")
        loop.trained(result)
        metrics = {"pretrain/loss": result.loss, "pretrain/ppl": math.exp(min(result.loss, 50.0)),
                   "train/lr": result.lr, "train/grad_norm": result.grad_norm, "time/step_s": time.time() - t0}
        if c.eval_every and (step + 1) % c.eval_every == 0 and step + 1 < loop.total:
            metrics["pretrain/eval_loss"] = held_out_nll(loop.learner, held_out)
        ctx.status(f"loss {result.loss:.3f}")
        loop.end_step(metrics, Cursor(cursor))
    ctx.write_metrics("pretrain", {"pretrain/eval_loss": held_out_nll(loop.learner, held_out)})
    loop.end_stage(Cursor(cursor))
