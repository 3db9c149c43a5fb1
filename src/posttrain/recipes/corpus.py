"""The corpus keys and reader shared by the stages that read a pretraining corpus (pretrain, rlp): not a stage."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from posttrain.config import StageConfig
from posttrain.data.corpus import env_documents, file_documents, mixed_documents, pack_tokens
from posttrain.runtime.parts import RunParts
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


def as_sequences(packed: list[list[int]]) -> Sequences:
    """Each packed sequence's first token is context; every later token is a target."""
    return Sequences([s[:1] for s in packed], [s[1:] for s in packed])


def corpus(parts: RunParts, c: CorpusConfig, cursor: int) -> tuple[Iterator[list[int]], Sequences]:
    """(the training stream of packed sequences from the `cursor`-th on, the held-out sequences)."""
    if c.data_path:
        docs = file_documents(Path(c.data_path))
        train_docs: Iterable[str] = itertools.chain.from_iterable(itertools.repeat(docs[:-HELD_OUT_DOCS] or docs))
        held_docs: Iterable[str] = itertools.cycle(docs[-HELD_OUT_DOCS:])
    else:
        train_docs = env_documents(parts.training_env(c.env_args), "train", parts.seed)
        held_docs = env_documents(parts.env, "eval", 0)
        if c.reasoning_fraction or c.distractor_fraction:
            traces = env_documents(parts.training_env({**c.env_args, **c.reasoning_args}), "train", parts.seed + 1)
            train_docs = mixed_documents(train_docs, traces, reasoning_fraction=c.reasoning_fraction,
                                         distractor_fraction=c.distractor_fraction, seed=parts.seed)
    stream = itertools.islice(pack_tokens(train_docs, parts.tokenizer, c.seq_len), cursor, None)
    held_out = list(itertools.islice(pack_tokens(held_docs, parts.tokenizer, c.seq_len), c.eval_sequences))
    return stream, as_sequences(held_out)
