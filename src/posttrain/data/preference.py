"""Preference pairs from a data file: rows of `prompt`, `chosen` and `rejected` strings (data/tables.py reads JSONL,
Parquet, CSV, JSON or a saved dataset directory; `columns` maps those names to the file's), as token ids, in a
seeded order per epoch, resumable by a cursor like the SFT stream.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.prompts import completion_ids, render_prompt
from posttrain.data.sft import is_prompt
from posttrain.data.tables import read_rows
from posttrain.errors import UserError

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def read_preference_rows(path: Path, columns: dict[str, str] | None = None,
                         what: str = "dpo.data_path") -> list[tuple[str, str | list, str, str]]:
    """(location, prompt, chosen, rejected) of every row; a row without the three strings is an error naming its
    file and line."""
    out = []
    for where, _, row in read_rows(path, columns, what=what):
        bad = [k for k in FIELDS if not (is_prompt(row.get(k)) if k == "prompt" else isinstance(row.get(k), str))]
        if bad:
            got = {k: type(row[k]).__name__ for k in FIELDS if k in row}
            raise UserError(f"{where}: expected a 'prompt' (a string or {{role, content}} messages) and strings "
                            f"'chosen' and 'rejected'; {bad[0]!r} is "
                            f"{got.get(bad[0], 'missing')} (columns: {sorted(row)}; map other names with "
                            "dpo.data_columns)")
        if row["chosen"] == row["rejected"]:
            raise UserError(f"{where}: 'chosen' and 'rejected' are the same text; the pair prefers nothing")
        out.append((where, row["prompt"], row["chosen"], row["rejected"]))
    if not out:
        raise UserError(f"{what}={str(path)!r}: no preference pairs (the file is empty)")
    return out


def file_pairs(path: Path, tokenizer, *, seed: int, chat_template: bool, max_len: int | None,
               columns: dict[str, str] | None = None) -> Iterator[Pair]:
    """Epochs over the file's pairs, each in a fresh seeded order."""
    pairs = []
    for where, prompt, chosen, rejected in read_preference_rows(path, columns):
        p = render_prompt(tokenizer, prompt, chat_template=chat_template, max_len=max_len)
        c, r = (completion_ids(tokenizer, text, chat_template=chat_template) for text in (chosen, rejected))
        if max_len is not None and len(p) + max(len(c), len(r)) > max_len:
            raise UserError(f"{where}: prompt + answer are {len(p) + max(len(c), len(r))} tokens, more than the "
                            f"model's context of {max_len}")
        pairs.append(Pair(p, c, r))
    for epoch in itertools.count():
        order = list(range(len(pairs)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for i in order:
            yield pairs[i]
