"""String transformations and their compositions, e.g. `reverse(sort(dcab))=` -> `dcba`.

Difficulty = composition depth, the setting of "From f(x) and g(x) to f(g(x))" (learning to compose atomic
skills with RL). Each op is a total function on strings, so every composition has one exact answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from posttrain.envs.base import check_split, exact_score, int_range, split_of, user_prompt
from posttrain.records import Message, Score, Task

OPS: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "rotl": lambda s: s[1:] + s[:1],  # rotate left by one
    "rotr": lambda s: s[-1:] + s[:-1],
    "dup": lambda s: s + s,
    "upper": str.upper,
    "swapcase": str.swapcase,
    "devowel": lambda s: "".join(c for c in s if c not in "aeiouAEIOU"),
}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


class Strings:
    """Compose string ops (reverse, sort, rotl, rotr, dup, upper, swapcase, devowel); difficulty = depth."""

    name = "strings"
    isolation = "inline"

    def __init__(self, depth: int | list[int] = (1, 2), length: int | list[int] = (3, 6),
                 ops: list[str] | None = None, worked: bool = False, max_answer_len: int = 32):
        self.depth = int_range(depth, "depth")
        self.length = int_range(length, "length")
        self.ops = list(ops) if ops is not None else list(OPS)
        unknown = [op for op in self.ops if op not in OPS]
        if not self.ops or unknown:
            raise ValueError(f"ops must be a non-empty list of {sorted(OPS)}, got unknown {unknown or self.ops!r}")
        self.worked = worked
        self.max_answer_len = max_answer_len

    def _sample(self, rng: random.Random) -> tuple[list[str], str, list[str]]:
        """(ops outermost first, input string, intermediate values innermost first); retried until the answer is
        non-empty and at most max_answer_len characters."""
        for _ in range(1000):
            d = rng.randint(*self.depth)
            chain = [rng.choice(self.ops) for _ in range(d)]
            s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(*self.length)))
            values = [s]
            for op in reversed(chain):
                values.append(OPS[op](values[-1]))
            if 0 < len(values[-1]) <= self.max_answer_len:
                return chain, s, values[1:]
        raise ValueError(f"strings: ops={self.ops} depth={self.depth} length={self.length} never give an answer "
                         f"of 1..{self.max_answer_len} characters; raise max_answer_len")

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(f"strings:{split}:{seed}")
        while True:
            chain, s, values = self._sample(rng)
            question = "".join(f"{op}(" for op in chain) + s + ")" * len(chain) + "="
            if split_of(question) != split:
                continue
            answer = values[-1]
            solution = answer
            if self.worked and len(chain) > 1:  # one line per inner step: `sort(dcab)=abcd`, then the answer
                inputs = [s, *values[:-1]]
                steps = [f"{op}({x})={y}" for op, x, y in zip(reversed(chain[1:]), inputs, values[:-1])]
                solution = "\n".join([*steps, answer])
            yield Task(id=question, question=question, answer=answer, solution=solution, difficulty=len(chain),
                       meta={"ops": chain, "input": s})

    def prompt(self, task: Task) -> list[Message]:
        return user_prompt(task)

    def score(self, task: Task, completion: str) -> Score:
        return exact_score(task, completion)
