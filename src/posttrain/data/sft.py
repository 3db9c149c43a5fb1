"""SFT examples: from an environment's gold solutions or a JSONL file; batching into length-bucketed micro-batches.

The stream is deterministic for a seed and resumable by a cursor (the number of examples already consumed).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from posttrain.data.jsonl import json_objects
from posttrain.data.prompts import completion_ids, render_prompt
from posttrain.errors import UserError


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    completion: list[int]


def env_examples(env, tokenizer, *, seed: int, chat_template: bool, max_len: int | None) -> Iterator[Example]:
    for task in env.tasks("train", seed):
        yield Example(render_prompt(tokenizer, env.prompt(task), chat_template=chat_template, max_len=max_len),
                      completion_ids(tokenizer, task.solution))


def read_jsonl_pairs(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise UserError(f"sft.data_path={str(path)!r}: file not found")
    pairs = []
    with path.open() as f:
        for lineno, row in json_objects(path, f):
            if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
                raise UserError(f"{path}:{lineno}: expected string 'prompt' and 'completion'; keys: {sorted(row)}")
            pairs.append((row["prompt"], row["completion"]))
    if not pairs:
        raise UserError(f"{path}: no examples (the file is empty)")
    return pairs


def jsonl_examples(path: Path, tokenizer, *, seed: int, chat_template: bool, max_len: int | None
                   ) -> Iterator[Example]:
    """Epochs over the file, each in a fresh seeded order."""
    pairs = read_jsonl_pairs(path)
    examples = [Example(render_prompt(tokenizer, p, chat_template=chat_template, max_len=max_len),
                        completion_ids(tokenizer, c)) for p, c in pairs]
    for epoch in itertools.count():
        order = list(range(len(examples)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for i in order:
            yield examples[i]


def micro_batches(examples: list[Example], size: int) -> list[list[Example]]:
    """Sort by length so each micro-batch pads little (length bucketing), then chunk."""
    ordered = sorted(examples, key=lambda e: len(e.prompt) + len(e.completion))
    return [ordered[i: i + size] for i in range(0, len(ordered), size)]


def collate(examples: list[Example], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask, loss_mask); loss_mask marks completion tokens as targets, aligned
    with input positions (position i's target is token i+1)."""
    width = max(len(e.prompt) + len(e.completion) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.float)
    for i, e in enumerate(examples):
        seq = e.prompt + e.completion
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        loss_mask[i, len(e.prompt): len(seq)] = 1
    return ids, attn, loss_mask
