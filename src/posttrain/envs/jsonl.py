"""User data: a file of {"prompt": ..., "answer": ...} rows scored by a chosen verifier: JSONL, Parquet, CSV, JSON
or a datasets save_to_disk directory (data/tables.py, which caps every row at 1 MiB); arg `columns` maps these
names to the file's own, e.g. columns = {prompt = "problem", answer = "solution"}. An answer is a non-empty string or
an integer (answer_text: NaN, true, 2.5 or null is an error naming the row).

Optional fields per row: "solution" (SFT target; default: the answer), "difficulty" (int), "id", "split"
("train"; "eval"/"test"/"validation"/"val"/"dev" all mean eval). Without "split", rows are split by
split_of(prompt). "question" is accepted for "prompt". Verifiers (arg `verifier`):
  exact       the completion's final line(s) equal the answer (as many lines as the answer has)
  normalized  the same after strip, casefold and whitespace collapsing
  numeric     the final line parses as a number within `tolerance` (relative and absolute) of the answer
  math        math-verify on the whole completion, in a killable worker (envs/mathverify.py)
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from posttrain.data.tables import read_rows
from posttrain.envs.base import (
    ANSWER_FORMAT,
    answer_matches,
    check_split,
    extract_answer,
    last_number,
    split_of,
    user_prompt,
)
from posttrain.errors import UserError
from posttrain.records import Message, Score, Task

_SPLIT_NAMES = {"train": "train", "eval": "eval", "test": "eval", "validation": "eval", "val": "eval",
                "dev": "eval"}
VERIFIERS = ("exact", "normalized", "numeric", "math")


def read_tasks(path: str | Path, *, solution_of: Callable[[str], str] = str,
               columns: dict[str, str] | None = None) -> list[tuple[str, Task]]:
    """(split, Task) for every row of a task file (data/tables.py: JSONL, Parquet, CSV, JSON or a saved dataset;
    `columns` maps prompt/answer/... to the file's names); a malformed row is a UserError naming file and row."""
    path = Path(path)
    rows = []
    for where, lineno, row in read_rows(path, columns, what="env.args.path"):
        prompt = row.get("prompt", row.get("question"))
        if not isinstance(prompt, str) or not prompt:
            raise UserError(f"{where}: needs a non-empty string 'prompt' (or 'question'); keys: {sorted(row)}")
        if "answer" not in row:
            raise UserError(f"{where}: needs an 'answer' (a string or an integer); keys: {sorted(row)}")
        answer = answer_text(row["answer"], where)
        split = row.get("split")
        if split is None:
            split = split_of(prompt)
        elif split not in _SPLIT_NAMES:
            raise UserError(f"{where}: split {split!r} is not one of {sorted(_SPLIT_NAMES)}")
        difficulty = row.get("difficulty", 0)
        if not isinstance(difficulty, int) or isinstance(difficulty, bool):
            raise UserError(f"{where}: difficulty must be an integer, got {difficulty!r}")
        solution = row.get("solution", solution_of(answer))
        if not isinstance(solution, str):
            raise UserError(f"{where}: solution must be a string, got {type(solution).__name__}")
        task_id = str(row.get("id", f"{path.stem}:{lineno}"))
        rows.append((_SPLIT_NAMES[split], Task(id=task_id, question=prompt, answer=answer, solution=solution,
                                               difficulty=difficulty, meta={"line": lineno})))
    if not rows:
        raise UserError(f"{path}: no tasks (the file is empty)")
    ids = [t.id for _, t in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{path}: duplicate id {dup!r}")
    return rows


def answer_text(value: object, where: str) -> str:
    """A row's answer as the text verifiers compare: a non-empty string as is, an integer in decimal (a float
    column's 7.0 is "7"). Anything else (NaN, true, 2.5, null, a list) is a UserError naming the row: in JSON or
    Parquet such a value is most often a broken export, and its str() ("nan", "True") is no answer anyone wrote;
    write a fractional answer as a string ("2.5"). A CSV cell is always text as written (data/tables.py)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise UserError(f"{where}: 'answer' must be a string or an integer, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise UserError(f"{where}: 'answer' is empty")
    return value


def content_digest(tasks: Iterable[Task]) -> str:
    """A short hash of the tasks' questions and answers in file order: the shuffle's salt, so the same rows give
    the same order whatever the file's path or format (.jsonl, .csv, .parquet, a copy elsewhere)."""
    h = hashlib.sha256()
    for task in tasks:
        h.update(json.dumps([task.question, task.answer]).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def shuffled(tasks: list[Task], split: str, seed: int, salt: str) -> Iterator[Task]:
    """A finite pass over `tasks` in an order fixed by (split, seed)."""
    order = list(tasks)
    random.Random(f"{salt}:{split}:{seed}").shuffle(order)
    return iter(order)


def _last_lines(completion: str, n: int) -> str:
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def _normalize(text: str) -> str:
    return " ".join(text.casefold().split())


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text: str) -> float | None:
    """The last number in the text (envs/base.py last_number), or None."""
    number = last_number(text)
    return None if number is None else float(number)


class Jsonl:
    """Your own tasks from a file of {"prompt", "answer"} rows; verifier exact|normalized|numeric|math."""

    name = "jsonl"
    isolation = "inline"  # the math verifier enforces its own hard timeout in a worker process

    def __init__(self, path: str, verifier: str = "exact", tolerance: float = 1e-6, timeout_s: float = 5.0,
                 columns: dict[str, str] | None = None):
        """columns: the file's names for prompt, answer, solution, difficulty, id, split."""
        self.answer_format = ("math-verify on the whole completion" if verifier == "math" else
                              f"{verifier}: single-line answers: {ANSWER_FORMAT}; multi-line answers: the last lines")
        if verifier not in VERIFIERS:
            raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
        self.path, self.verifier, self.tolerance = str(path), verifier, tolerance
        self._math = None
        if verifier == "math":
            from posttrain.envs.mathverify import MathVerifier

            self._math = MathVerifier(timeout_s=timeout_s)
        rows = read_tasks(path, solution_of=_math_solution if verifier == "math" else str, columns=columns)
        self._by_split: dict[str, list[Task]] = {"train": [], "eval": []}
        for split, task in rows:
            self._by_split[split].append(task)
        self._salt = "jsonl:" + content_digest(task for _, task in rows)

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        return shuffled(self._by_split[split], split, seed, self._salt)

    def prompt(self, task: Task) -> list[Message]:
        return user_prompt(task)

    def score(self, task: Task, completion: str) -> Score:
        answer: str = task.answer
        if self._math is not None:
            return self._math.verify(answer, completion)
        if self.verifier == "numeric":
            want, got = parse_number(answer), parse_number(extract_answer(completion))
            if want is None:
                return Score(0.0, False, {"error": "bad_answer", "detail": f"answer {answer!r} is not a number"})
            ok = got is not None and math.isclose(got, want, rel_tol=self.tolerance, abs_tol=self.tolerance)
            return Score(1.0 if ok else 0.0, ok, {} if ok else {"got": got})
        n = max(1, len(answer.strip().splitlines()))
        got = extract_answer(completion) if n == 1 else _last_lines(completion, n)
        want = "\n".join(line.strip() for line in answer.strip().splitlines())
        if self.verifier == "normalized":
            ok = _normalize(got) == _normalize(want)
        else:
            ok = answer_matches(got, want) if n == 1 else got == want
        return Score(1.0 if ok else 0.0, ok, {} if ok else {"got": got[:50]})


def _math_solution(answer: str) -> str:
    """A gold completion math-verify reads back: a plain number as is, anything else inside \\boxed{}."""
    return answer if _NUMBER.fullmatch(answer.strip()) or "\\boxed" in answer else f"\\boxed{{{answer}}}"


class Math:
    """Math word problems from a JSONL file, answers checked by math-verify under a hard timeout."""

    name = "math"
    isolation = "inline"

    def __init__(self, path: str, timeout_s: float = 5.0, columns: dict[str, str] | None = None):
        self._data = Jsonl(path, verifier="math", timeout_s=timeout_s, columns=columns)
        self.answer_format = self._data.answer_format

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        return self._data.tasks(split, seed)

    def prompt(self, task: Task) -> list[Message]:
        return self._data.prompt(task)

    def score(self, task: Task, completion: str) -> Score:
        return self._data.score(task, completion)

    def close(self) -> None:
        """Stop the math-verify worker process now (it also stops when this process exits)."""
        if self._data._math is not None:
            self._data._math.close()
