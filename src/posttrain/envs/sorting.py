"""Sort a short list of integers or words, ascending (`sort(5 3 9)=`) or descending (`rsort(5 3 9)=`).
Difficulty = list length."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from posttrain.envs.base import check_split, final_line, int_range, split_of, user_prompt
from posttrain.records import Message, Score, Task

LETTERS = "abcdefghijklmnopqrstuvwxyz"


class Sorting:
    """Sort integers or words (order asc/desc/both); difficulty = list length; answer is space-separated."""

    name = "sorting"
    isolation = "inline"

    def __init__(self, length: int | list[int] = (3, 6), items: str = "ints", order: str = "asc",
                 max_value: int = 99):
        self.length = int_range(length, "length")
        if items not in ("ints", "words"):
            raise ValueError(f"items must be 'ints' or 'words', got {items!r}")
        if order not in ("asc", "desc", "both"):
            raise ValueError(f"order must be 'asc', 'desc' or 'both', got {order!r}")
        if max_value < 1:
            raise ValueError(f"max_value must be >= 1, got {max_value!r}")
        self.items, self.order, self.max_value = items, order, max_value

    def _item(self, rng: random.Random) -> str:
        if self.items == "ints":
            return str(rng.randint(0, self.max_value))
        return "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 4)))

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(f"sorting:{split}:{seed}")
        key = int if self.items == "ints" else str
        while True:
            n = rng.randint(*self.length)
            xs = [self._item(rng) for _ in range(n)]
            desc = self.order == "desc" or (self.order == "both" and rng.random() < 0.5)
            question = f"{'rsort' if desc else 'sort'}({' '.join(xs)})="
            if split_of(question) != split:
                continue
            answer = " ".join(sorted(xs, key=key, reverse=desc))
            yield Task(id=question, question=question, answer=answer, solution=answer, difficulty=n,
                       meta={"descending": desc})

    def prompt(self, task: Task) -> list[Message]:
        return user_prompt(task)

    def score(self, task: Task, completion: str) -> Score:
        """Items of the final line split on spaces/commas must equal the sorted list (so `3, 5, 9` is accepted)."""
        got = [t for t in re.split(r"[\s,]+", final_line(completion)) if t]
        ok = got == task.answer.split()
        return Score(reward=1.0 if ok else 0.0, correct=ok, info={} if ok else {"got": " ".join(got)[:50]})
