"""SFT examples: from an environment's gold solutions or a data file, and their length-bucketed order.

The stream is deterministic for a seed and resumable by a cursor (the number of examples already consumed).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.prompts import completion_ids, render_prompt
from posttrain.data.tables import read_rows
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


def example(tokenizer, prompt: list | str, completion: str, *, chat_template: bool, max_len: int | None,
            where: str) -> Example:
    """One example as token ids; a prompt or prompt + completion longer than the context is a UserError naming
    where it came from (a data file's row, an environment's task)."""
    try:
        ids = render_prompt(tokenizer, prompt, chat_template=chat_template, max_len=max_len)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return fitting(Example(ids, completion_ids(tokenizer, completion, chat_template=chat_template)), max_len, where)


def env_examples(env, tokenizer, *, seed: int, chat_template: bool, max_len: int | None) -> Iterator[Example]:
    """The environment's gold solutions on its train split; for an environment with `demonstration(task, rng)`
    (a whole conversation, e.g. a multi-turn episode), one example per assistant turn, its prompt the
    conversation before it."""
    demonstrate = getattr(env, "demonstration", None)
    rng = random.Random(f"demonstrations:{seed}")
    for task in env.tasks("train", seed):
        where = f"environment {env.name!r}, task {task.id!r}"
        if demonstrate is None:
            yield example(tokenizer, env.prompt(task), task.solution, chat_template=chat_template, max_len=max_len,
                          where=where)
            continue
        messages = demonstrate(task, rng)
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                yield example(tokenizer, messages[:k], message["content"], chat_template=chat_template,
                              max_len=max_len, where=f"{where}, turn {k}")


def is_prompt(value: object) -> bool:
    """A prompt in a data file: a string (the user message) or a list of chat messages {role, content}."""
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value))


def read_pairs(path: Path, columns: dict[str, str] | None = None, *,
               section: str = "sft") -> list[tuple[str, str | list, str]]:
    """(location, prompt, completion) of every row of a data file (data/tables.py: JSONL, Parquet, CSV, JSON or
    a saved dataset directory; `columns` maps prompt/completion to the file's column names). A prompt is a string
    or a list of chat messages ({role, content}, rendered with the chat template). `section` names the recipe
    section whose data_path / data_columns errors refer to. Rows pass data/tables.py's checks (at most 1 MiB, no
    lone surrogate)."""
    pairs = []
    for where, _, row in read_rows(path, columns, what=f"{section}.data_path"):
        if not is_prompt(row.get("prompt")) or not isinstance(row.get("completion"), str):
            raise UserError(f"{where}: expected a 'prompt' (a string or a list of {{role, content}} messages) and a "
                            f"string 'completion' (map other column names with {section}.data_columns); columns: "
                            f"{sorted(row)}")
        pairs.append((where, row["prompt"], row["completion"]))
    if not pairs:
        raise UserError(f"{path}: no examples (the file is empty)")
    return pairs


def file_examples(path: Path, tokenizer, *, seed: int, chat_template: bool, max_len: int | None,
                  columns: dict[str, str] | None = None) -> Iterator[Example]:
    """Epochs over the file, each in a fresh seeded order."""
    pairs = read_pairs(path, columns)
    examples = [example(tokenizer, p, c, chat_template=chat_template, max_len=max_len, where=where)
                for where, p, c in pairs]
    for epoch in itertools.count():
        order = list(range(len(examples)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for i in order:
            yield examples[i]


def length_order(examples: list[Example]) -> list[int]:
    """Row order shortest to longest, so each micro-batch pads little (length bucketing)."""
    return sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].completion))
