"""SFT examples: from an environment's gold solutions or a JSONL file, and their length-bucketed order.

The stream is deterministic for a seed and resumable by a cursor (the number of examples already consumed).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


def length_order(examples: list[Example]) -> list[int]:
    """Row order shortest to longest, so each micro-batch pads little (length bucketing)."""
    return sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].completion))
