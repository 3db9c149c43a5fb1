"""Multi-digit arithmetic with an exact verifier. Difficulty = number of digits of the operands."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from posttrain.envs.base import (
    ANSWER_FORMAT,
    check_split,
    exact_score,
    extract_answer,
    int_range,
    split_of,
    user_prompt,
)
from posttrain.records import Message, Score, Task


def worked_solution(a: int, op: str, b: int) -> str:
    """Column-by-column lines ending in the answer: '+' and '-' digit by digit (carry/borrow shown as the
    third term), '*' as partial products. E.g. 47+85 -> '7+5+0=12\\n4+8+1=13\\n132'."""
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    lines = []
    if op == "*":
        for i, d in enumerate(reversed(str(b))):
            lines.append(f"{a}*{d}{'0' * i}={a * int(d) * 10**i}")
    else:
        big, small = (a, b) if op == "+" or a >= b else (b, a)
        if op == "-" and a < b:
            lines.append(f"-({big}-{small})")
        xs, ys = str(big)[::-1], str(small)[::-1]
        carry = 0
        for i in range(len(xs)):
            x, y = int(xs[i]), int(ys[i]) if i < len(ys) else 0
            if op == "+":
                lines.append(f"{x}+{y}+{carry}={x + y + carry}")
                carry = (x + y + carry) // 10
            else:
                r = x - y - carry
                lines.append(f"{x + 10 if r < 0 else x}-{y}-{carry}={r % 10}")
                carry = 1 if r < 0 else 0
    if len(lines) <= 1 and op != "-":
        return str(answer)
    return "\n".join([*lines, str(answer)])


PHRASINGS = ("bare", "question", "story")
WORDS = {"+": "+", "-": "-", "*": "times"}
# One-step word problems, GSM-style in form: the numbers sit in a sentence and the operation is implied by it.
# A task's template, name and object are drawn from its bare form, so a problem reads the same in every run.
STORIES = {
    "+": ("{name} has {a} {things}. {pronoun} gets {b} more. How many {things} does {name} have now?",
          ("A shop sold {a} {things} in the morning and {b} in the afternoon. How many {things} did it sell "
           "that day?"),
          "One box holds {a} {things} and another holds {b}. How many {things} are in the two boxes together?"),
    "*": ("{name} buys {a} bags with {b} {things} in each bag. How many {things} does {name} buy?",
          "A classroom has {a} rows of desks with {b} {things} on each row. How many {things} are there?"),
}
NAMES = (("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Sam", "He"), ("Zoe", "She"), ("Ben", "He"))
THINGS = ("apples", "marbles", "stickers", "books", "pencils", "shells")


def story(a: int, op: str, b: int) -> str:
    """`a op b` as a one-step word problem ('Mia has 23 apples. She gets 45 more. How many ...?')."""
    rng = random.Random(f"story:{a}{op}{b}")
    name, pronoun = rng.choice(NAMES)
    return rng.choice(STORIES[op]).format(a=a, b=b, name=name, pronoun=pronoun, things=rng.choice(THINGS))


class Arithmetic:
    """`a+b=` with an exact integer answer; difficulty = operand digits (int or [min, max]); ops from '+-*'.

    phrasing "bare" asks `78+27=` (the character-level form the tiny built-in models learn by SFT); "question"
    asks `What is 78 + 27?`, the form a pretrained chat model reads; "story" asks a one-step word problem ('Mia
    has 78 apples. She gets 27 more. How many apples does Mia have now?'; ops '+' and '*' only, as a story's
    count cannot go below zero). A task's id is its bare form in all three, and the bare form decides its split,
    so every phrasing holds out the same problems."""

    name = "arithmetic"
    isolation = "inline"
    answer_format = ANSWER_FORMAT + "; an echoed question ('12+34=46') counts as its answer"

    def __init__(self, digits: int | list[int] = 3, ops: str = "+", worked: bool = False, phrasing: str = "bare"):
        self.digits = int_range(digits, "digits")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty string of '+', '-', '*', got {ops!r}")
        if phrasing not in PHRASINGS:
            raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
        if phrasing == "story" and "-" in ops:
            raise ValueError("phrasing 'story' takes ops '+' and '*' (a count in a story cannot go below zero), "
                             f"got ops={ops!r}")
        self.ops, self.worked, self.phrasing = ops, worked, phrasing

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(f"arithmetic:{split}:{seed}")
        while True:
            d = rng.randint(*self.digits)
            a = rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)
            b = rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)
            op = rng.choice(self.ops)
            bare = f"{a}{op}{b}="
            if split_of(bare) != split:
                continue
            yield self._task(a, op, b, d)

    def _task(self, a: int, op: str, b: int, difficulty: int) -> Task:
        bare = f"{a}{op}{b}="
        if self.phrasing == "story":
            question = story(a, op, b)
        else:
            question = bare if self.phrasing == "bare" else f"What is {a} {WORDS[op]} {b}?"
        answer = str({"+": a + b, "-": a - b, "*": a * b}[op])
        solution = worked_solution(a, op, b) if self.worked else answer
        return Task(id=bare, question=question, answer=answer, solution=solution, difficulty=difficulty)

    def prompt(self, task: Task) -> list[Message]:
        return user_prompt(task)

    def easier(self, task: Task) -> Task | None:
        """The rescue variant of a task the policy never solves (data/curricula.py): each operand one digit
        shorter (its leading digit dropped, else its last), a training-split task; None for 1-digit operands."""
        op = next((o for o in "+-*" if o in task.id[1:]), None)
        if op is None or task.difficulty <= 1:
            return None
        a, b = task.id[:-1].split(op, 1)
        for cut in (lambda x: x[1:].lstrip("0") or "0", lambda x: x[:-1]):
            x, y = int(cut(a)), int(cut(b))
            if split_of(f"{x}{op}{y}=") == "train":
                return self._task(x, op, y, task.difficulty - 1)
        return None

    def score(self, task: Task, completion: str) -> Score:
        return exact_score(task, self._answer_text(task, completion))

    def answer_parses(self, task: Task, completion: str) -> bool:
        """The `format` reward control's test: the answer the verifier reads is an integer."""
        return bool(re.fullmatch(r"-?\d+", extract_answer(self._answer_text(task, completion))))

    @staticmethod
    def _answer_text(task: Task, completion: str) -> str:
        answer = extract_answer(completion)
        if answer.startswith(task.id):  # '123+456=579': the bare question echoed before its answer
            return answer[len(task.id):]
        return completion
