"""The Environment protocol (a task source plus its verifier) and helpers shared by the environments:
the split rule, int-range arguments and final-line answer extraction."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Literal, Protocol, runtime_checkable

from posttrain.records import Message, Score, Task

SPLITS = ("train", "eval")

Isolation = Literal["inline", "thread", "process"]
"""How `envs.scoring.score_many` runs an environment's `score` (an optional class attribute `isolation`):
  inline:  in the caller's thread. Only for trusted, fast, pure-Python verifiers (the built-ins). Exceptions and
           NaN rewards are still caught, and a call that overran the timeout is still reported as one, but a
           verifier that never returns blocks the caller.
  thread:  in a short-lived thread per sample, `workers` at a time. For verifiers that bound their own time (a
           sandboxed subprocess) and mostly wait on I/O. The caller stops waiting at the timeout; a thread that
           truly hangs is abandoned, not killed.
  process: in a pool of persistent worker processes that are killed and replaced on timeout. For third-party or
           untrusted verifiers. Costs a pickle round trip per sample.
"""


@runtime_checkable
class Environment(Protocol):
    """A source of tasks with a verifiable reward.

    `score` is the single scoring function used both for RL rewards and for evaluation. It must be deterministic;
    the caller runs it through envs/scoring.py (exception/NaN guards, timeouts, isolation per `isolation`).
    """

    name: str

    def tasks(self, split: str, seed: int) -> Iterator[Task]: ...

    def prompt(self, task: Task) -> list[Message] | str: ...

    def score(self, task: Task, completion: str) -> Score: ...


def split_of(key: str, eval_fraction: float = 0.1) -> str:
    """Assign a problem to a split by a stable hash of its canonical text, so train and eval never overlap
    whatever the seed or the order of generation."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "eval" if h < eval_fraction else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def int_range(value: int | list[int] | tuple[int, int], name: str, minimum: int = 1) -> tuple[int, int]:
    """An env argument that is an int or an inclusive [min, max] range, validated."""
    if isinstance(value, int) and not isinstance(value, bool):
        lo, hi = value, value
    elif isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        lo, hi = value
    else:
        raise ValueError(f"{name} must be an int or [min, max], got {value!r}")
    if not minimum <= lo <= hi:
        raise ValueError(f"{name} must be >= {minimum} and ordered, got {value!r}")
    return lo, hi


def final_line(completion: str) -> str:
    """The answer of a built-in task: the last non-empty line of the completion, stripped.

    Built-in gold solutions are either just the answer or a few worked lines followed by the answer line,
    so both answer-only and worked completions are scored the same way.
    """
    lines = [line.strip() for line in completion.strip().splitlines()]
    return next((line for line in reversed(lines) if line), "")


_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*", re.IGNORECASE)
ANSWER_FORMAT = ("the content of the last \\boxed{...}; else what follows the last 'answer is' / 'Answer:'; else "
                 "the last non-empty line; then without surrounding ** / __ / $ / backticks and a trailing period; "
                 "a numeric answer also counts as the last number written there ('55 + 69 = 124')")


def extract_answer(completion: str) -> str:
    """The answer a completion gives, in the formats models write it (ANSWER_FORMAT): '579', '579.',
    'The answer is 579', '**579**', '\\boxed{579}' and worked lines ending in '579' all give '579'."""
    boxed = list(_BOXED.finditer(completion))
    if boxed:
        start, depth = boxed[-1].end(), 1
        for i in range(start, len(completion)):
            depth += {"{": 1, "}": -1}.get(completion[i], 0)
            if depth == 0:
                return _clean(completion[start:i])
    said = list(_ANSWER_IS.finditer(completion))
    if said:
        rest = completion[said[-1].end():].strip().splitlines()
        if rest:
            return _clean(rest[0])
    return _clean(final_line(completion))


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A number as prose writes it, standing on its own: not glued to letters or brackets ('l7', '14}c' and 'x2' hold
# none), and with a sign only where it cannot be an operator ('5-3' ends in 3; '= -2' and '(-2)' in -2).
_WRITTEN_NUMBER = re.compile(r"(?<![\w.}\]])(?:(?<![\w)\]])[-+])?(?:\d+(?:\.\d+)?|\.\d+)(?![\w{}\[(]|\.\d)")


def last_number(text: str) -> str | None:
    """The last number written in the text, thousands separators removed, or None: what a chat model's sentence
    answers ('55 + 69 = 124', '8 + 3 equals 11.', 'It costs $1,234' give '124', '11', '1234')."""
    found = _WRITTEN_NUMBER.findall(_THOUSANDS.sub("", text))
    return found[-1].removeprefix("+") if found else None


def is_number(text: str) -> bool:
    return bool(_NUMBER.fullmatch(str(text).strip()))


def answer_matches(got: str, want: str) -> bool:
    """An extracted answer (extract_answer) against the reference: equal strings; and for a numeric reference, the
    answer's last number equal to it as a number, so the forms chat models write ('55 + 69 = 124', 'so the total
    is 11 apples') count while '12' against '124' does not. Every built-in exact verifier decides by this."""
    if got == want:
        return True
    if not is_number(want):
        return False
    number = last_number(got)
    return number is not None and float(number) == float(want)


def answer_parses(env: object, task: Task, completion: str) -> bool:
    """Does the completion give an answer in the task's form? (the `format` reward control): the environment's
    own `answer_parses(task, completion)` when it has one; else a non-empty extracted answer (extract_answer),
    which must be a number when the task's reference answer is one."""
    own = getattr(env, "answer_parses", None)
    if callable(own):
        return bool(own(task, completion))
    got = extract_answer(completion)
    if not got:
        return False
    return bool(_NUMBER.fullmatch(got.replace(",", ""))) if _NUMBER.fullmatch(str(task.answer).strip()) else True


def _clean(text: str) -> str:
    text = text.strip()
    for mark in ("**", "__", "$", "`"):
        if len(text) > 2 * len(mark) and text.startswith(mark) and text.endswith(mark):
            text = text[len(mark):-len(mark)].strip()
    return text[:-1].rstrip() if text.endswith(".") and not text.endswith("..") else text


def user_prompt(task: Task) -> list[Message]:
    """The task's question as the user turn (a format instruction for instruct models is `hint`, which every
    environment takes: envs/prompting.py)."""
    return [{"role": "user", "content": task.question}]


def exact_score(task: Task, completion: str) -> Score:
    """1.0 when the completion's answer (extract_answer) equals the task's answer (answer_matches)."""
    got = extract_answer(completion)
    ok = answer_matches(got, task.answer)
    return Score(reward=1.0 if ok else 0.0, correct=ok, info={} if ok else {"got": got[:50]})
