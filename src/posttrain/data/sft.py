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


def fitting(example: Example, max_len: int | None, where: str) -> Example:
    """The example, if prompt + completion fit the model's context; else a UserError naming where it came from."""
    n = len(example.prompt) + len(example.completion)
    if max_len is not None and n > max_len:
        raise UserError(f"{where}: prompt + completion are {n} tokens, more than the model's context of {max_len}")
    return example


def env_examples(env, tokenizer, *, seed: int, chat_template: bool, max_len: int | None) -> Iterator[Example]:
    for task in env.tasks("train", seed):
        yield fitting(Example(render_prompt(tokenizer, env.prompt(task), chat_template=chat_template,
                                            max_len=max_len),
                              completion_ids(tokenizer, task.solution, chat_template=chat_template)),
                      max_len, f"environment {env.name!r}, task {task.id!r}")


def read_jsonl_pairs(path: Path) -> list[tuple[int, str, str]]:
    """(line number, prompt, completion) of every line."""
    if not path.is_file():
        raise UserError(f"sft.data_path={str(path)!r}: file not found")
    pairs = []
    for lineno, row in json_objects(path):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise UserError(f"{path}:{lineno}: expected string 'prompt' and 'completion'; keys: {sorted(row)}")
        pairs.append((lineno, row["prompt"], row["completion"]))
    if not pairs:
        raise UserError(f"{path}: no examples (the file is empty)")
    return pairs


def jsonl_examples(path: Path, tokenizer, *, seed: int, chat_template: bool, max_len: int | None
                   ) -> Iterator[Example]:
    """Epochs over the file, each in a fresh seeded order."""
    pairs = read_jsonl_pairs(path)
    examples = [fitting(Example(render_prompt(tokenizer, p, chat_template=chat_template, max_len=max_len),
                                completion_ids(tokenizer, c, chat_template=chat_template)), max_len, f"{path}:{lineno}")
                for lineno, p, c in pairs]
    for epoch in itertools.count():
        order = list(range(len(examples)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for i in order:
            yield examples[i]


def length_order(examples: list[Example]) -> list[int]:
    """Row order shortest to longest, so each micro-batch pads little (length bucketing)."""
    return sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].completion))
