"""Countdown: reach a target with the given numbers using + - * and exact /, each number at most once.

The verifier never calls eval(): a small recursive-descent parser reads the final line of the completion
(tokens: integers, + - * / and parentheses; at most 64 tokens), checks every literal against the multiset of
given numbers and evaluates with exact integer arithmetic (a division must leave no remainder).
Difficulty = how many numbers are given (the gold solution uses all of them).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator

from posttrain.envs.base import check_split, final_line, int_range, split_of, user_prompt
from posttrain.records import Message, Score, Task

_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
MAX_TOKENS = 64


class ExprError(ValueError):
    """The expression cannot be parsed or evaluated (message says why)."""


def tokenize(text: str) -> list[str]:
    tokens, pos, text = [], 0, text.rstrip()
    if len(text) > 256:
        raise ExprError(f"expression longer than 256 characters ({len(text)})")
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ExprError(f"unexpected character {text[pos:].strip()[:1]!r}")
        tokens.append(m.group(1))
        pos = m.end()
        if len(tokens) > MAX_TOKENS:
            raise ExprError(f"more than {MAX_TOKENS} tokens")
    return tokens


def evaluate(text: str) -> tuple[int, list[int]]:
    """(value, integer literals used) of an expression over + - * / and parentheses; no unary minus."""
    tokens = tokenize(text)
    literals: list[int] = []
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ExprError("unexpected end of expression")
        pos += 1
        return tokens[pos - 1]

    def atom() -> int:
        tok = take()
        if tok == "(":
            value = expr()
            if take() != ")":
                raise ExprError("missing ')'")
            return value
        if tok.isdigit():
            literals.append(int(tok))
            return int(tok)
        raise ExprError(f"unexpected {tok!r}")

    def term() -> int:
        value = atom()
        while peek() in ("*", "/"):
            op, rhs = take(), atom()
            if op == "*":
                value *= rhs
            elif rhs == 0 or value % rhs:
                raise ExprError(f"inexact division {value}/{rhs}")
            else:
                value //= rhs
        return value

    def expr() -> int:
        value = term()
        while peek() in ("+", "-"):
            op, rhs = take(), term()
            value = value + rhs if op == "+" else value - rhs
        return value

    value = expr()
    if pos != len(tokens):
        raise ExprError(f"unexpected {tokens[pos]!r}")
    return value, literals


def _combine(a: tuple[int, str, int], op: str, b: tuple[int, str, int]) -> tuple[int, str, int]:
    """Join (value, text, precedence) pairs with the fewest parentheses that keep the meaning."""
    p = _PREC[op]
    left = f"({a[1]})" if a[2] < p else a[1]
    right = f"({b[1]})" if b[2] < p or (b[2] == p and op in "-/") else b[1]
    value = {"+": a[0] + b[0], "-": a[0] - b[0], "*": a[0] * b[0], "/": a[0] // b[0] if b[0] else 0}[op]
    return value, f"{left}{op}{right}", p


class Countdown:
    """Reach a target from given numbers with + - * / (each at most once); difficulty = how many numbers."""

    name = "countdown"
    isolation = "inline"

    def __init__(self, count: int | list[int] = (3, 4), max_number: int = 20, ops: str = "+-*/",
                 max_target: int = 999):
        self.count = int_range(count, "count", minimum=2)
        if not ops or set(ops) - set("+-*/"):
            raise ValueError(f"ops must be a non-empty string of '+-*/', got {ops!r}")
        if max_number < 1 or max_target < 1:
            raise ValueError(f"max_number and max_target must be >= 1, got {max_number!r}, {max_target!r}")
        self.ops, self.max_number, self.max_target = ops, max_number, max_target

    def _sample(self, rng: random.Random) -> tuple[list[int], int, str]:
        """Numbers, target, and a gold expression built by combining random pairs until one value remains.
        Intermediate values stay positive integers, so the gold expression is valid under the verifier."""
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(rng.randint(*self.count))]
            pool = [(n, str(n), 3) for n in nums]
            while len(pool) > 1:
                a = pool.pop(rng.randrange(len(pool)))
                b = pool.pop(rng.randrange(len(pool)))
                choices = self._valid_ops(a[0], b[0])
                if not choices:
                    a, b = b, a
                    choices = self._valid_ops(a[0], b[0])
                if not choices:  # e.g. ops="-" and a == b: start over
                    break
                pool.append(_combine(a, rng.choice(choices), b))
            if len(pool) == 1 and 1 <= pool[0][0] <= self.max_target:
                return sorted(nums), pool[0][0], pool[0][1]

    def _valid_ops(self, a: int, b: int) -> list[str]:
        return [op for op in self.ops if (op != "-" or a > b) and (op != "/" or (b > 1 and a % b == 0))]

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(f"countdown:{split}:{seed}")
        while True:
            nums, target, expression = self._sample(rng)
            question = f"make {target} with {' '.join(map(str, nums))}:"  # numbers sorted: one canonical text
            if split_of(question) != split:
                continue
            yield Task(id=question, question=question, answer=str(target), solution=expression,
                       difficulty=len(nums), meta={"numbers": nums, "target": target})

    def prompt(self, task: Task) -> list[Message]:
        return user_prompt(task)

    def score(self, task: Task, completion: str) -> Score:
        """Correct when the final line (text before any '=') evaluates to the target using given numbers only."""
        line = final_line(completion).split("=")[0]
        try:
            value, used = evaluate(line)
        except ExprError as e:
            return Score(0.0, False, {"reason": "parse", "detail": str(e), "got": line[:50]})
        extra = Counter(used) - Counter(task.meta["numbers"])
        if extra:
            return Score(0.0, False, {"reason": "numbers", "detail": f"not given (or used too often): "
                                      f"{sorted(extra.elements())}", "got": line[:50]})
        ok = value == int(task.answer)
        return Score(1.0 if ok else 0.0, ok, {} if ok else {"reason": "value", "value": value, "got": line[:50]})
