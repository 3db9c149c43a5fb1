"""A pretraining corpus as documents: a text file's lines, a .jsonl file's "text" fields, or an environment's tasks
written out as plain statements (the environment is passed in: data/ imports no envs/), optionally mixed with
reasoning traces and distractors, then packed into fixed-length token sequences."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from posttrain.data.jsonl import json_objects
from posttrain.errors import UserError


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
