"""Tiny programming tasks (`Write f(x) returning (x+1)*3.`) verified by running the program in the sandbox.

The completion is Python source (a ```python fence is accepted), run by envs/sandbox.py with
`check_function`: the program's `f` is called on a few inputs in a limited child process and the values it
returns are compared here with values computed by this module, so the expected outputs never reach the
program. Difficulty = number of operations in the `expr` family (the other families are difficulty 1).
A fixed-text family ("sum", "max", ...) has one question, so split_of puts all of it in one split.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator

from posttrain.envs.base import check_split, int_range, split_of, user_prompt
from posttrain.envs.sandbox import check_function, environment_limits
from posttrain.records import Message, Score, Task

_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block if there is one, else the whole completion."""
    m = _FENCE.search(completion)
    return (m.group(1) if m else completion).strip("\n")


def _expr(rng: random.Random, depth: int) -> tuple[str, Callable[[int], int]]:
    """A chain of `depth` ops on x, printed with the parentheses Python precedence needs."""
    text, steps = "x", []
    for _ in range(depth):
        op, c = rng.choice("+-*"), rng.randint(1, 9)
        if op == "*" and ("+" in text or "-" in text):
            text = f"({text})"
        text = f"{text}{op}{c}"
        steps.append((op, c))

    def fn(x: int) -> int:
        for op, c in steps:
            x = x + c if op == "+" else x - c if op == "-" else x * c
        return x

    return text, fn


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcde") for _ in range(rng.randint(0, 6)))


def _ints(rng: random.Random) -> list[int]:
    return [rng.randint(-9, 20) for _ in range(rng.randint(1, 5))]


# family -> (question, solution, reference function, argument sampler), built per task from an rng
FAMILIES = ("expr", "reverse", "sum", "max", "count", "evens")


def _family(name: str, rng: random.Random, depth: int):
    if name == "expr":
        text, fn = _expr(rng, depth)
        return f"Write f(x) returning {text}.", f"def f(x):\n    return {text}", fn, lambda: rng.randint(-9, 20)
    if name == "reverse":
        return ("Write f(s) returning s reversed.", "def f(s):\n    return s[::-1]", lambda s: s[::-1],
                lambda: _word(rng))
    if name == "sum":
        return "Write f(xs) returning the sum of xs.", "def f(xs):\n    return sum(xs)", sum, lambda: _ints(rng)
    if name == "max":
        return ("Write f(xs) returning the largest of xs.", "def f(xs):\n    return max(xs)", max,
                lambda: _ints(rng))
    if name == "count":
        c = rng.choice("abcde")
        return (f"Write f(s) returning how many '{c}' are in s.", f"def f(s):\n    return s.count('{c}')",
                lambda s: s.count(c), lambda: _word(rng))
    if name == "evens":
        return ("Write f(xs) returning the even items of xs.", "def f(xs):\n    return [x for x in xs if x%2==0]",
                lambda xs: [x for x in xs if x % 2 == 0], lambda: _ints(rng))
    raise ValueError(f"unknown code family {name!r}; known: {FAMILIES}")


class Code:
    """Write a tiny Python function f; scored by running it in the sandbox on hidden inputs."""

    name = "code"
    isolation = "thread"  # each score is a sandboxed subprocess with its own timeout: run them concurrently

    def __init__(self, depth: int | list[int] = (1, 2), families: list[str] | None = None, cases: int = 4,
                 timeout_s: float = 5.0, memory_mb: int = 512, sandbox: str = "bwrap"):
        """sandbox: "bwrap" (namespaces + seccomp, envs/bwrap.py) or "weak" (no OS isolation: only for machines
        without user namespaces, chosen by name, and written to the run log)."""
        self.depth = int_range(depth, "depth")
        self.families = list(families) if families is not None else list(FAMILIES)
        unknown = [f for f in self.families if f not in FAMILIES]
        if not self.families or unknown:
            raise ValueError(f"families must be a non-empty list of {FAMILIES}, got unknown {unknown!r}")
        if cases < 1:
            raise ValueError(f"cases must be >= 1, got {cases!r}")
        self.n_cases = cases
        self.limits, self.warning = environment_limits("code environment", timeout_s=timeout_s,
                                                       memory_mb=memory_mb, sandbox=sandbox)

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(f"code:{split}:{seed}")
        while True:
            family = rng.choice(self.families)
            depth = rng.randint(*self.depth) if family == "expr" else 1
            question, solution, fn, sample = _family(family, rng, depth)
            if split_of(question) != split:
                continue
            args = [sample() for _ in range(self.n_cases)]
            cases = [(f"f({a!r})", fn(a)) for a in args]
            yield Task(id=f"{question}#{rng.getrandbits(32):08x}", question=question, answer=cases,
                       solution=solution, difficulty=depth, meta={"family": family})

    def prompt(self, task: Task) -> list[Message]:
        return user_prompt(task)

    def score(self, task: Task, completion: str) -> Score:
        return check_function(extract_code(completion), task.answer, self.limits)
