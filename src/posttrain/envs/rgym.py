"""reasoning-gym adapter: any of its procedural datasets, scored by reasoning-gym's own `score_answer`.

    make_env("reasoning_gym", {"dataset": "chain_sum", "size": 2000, "min_terms": 2, "max_terms": 3})

The dataset is generated offline with `size` items from its own `seed`; `tasks(split, seed)` is a finite
pass over the items whose question falls in `split` (split_of on the question text), in an order fixed by the
seed. The completion's answer is the text inside <answer>...</answer> when the tags are there (reasoning-gym's
convention), else the best-scoring of the whole stripped completion, extract_answer's reading of it and that
reading's last number (what chat models write: '8 + 3 equals 11.'). A format instruction for every prompt is
the `hint` every environment takes (envs/prompting.py, e.g. "Give only the final answer."). reward =
score_answer's score (reasoning-gym gives partial credit on some datasets, e.g. spell_backward and countdown's
0.01 for a well-formed wrong answer); correct = score >= threshold (default 1.0, with a 1e-9 slack).

Caveat: five datasets accept many valid answers and score their own stored answer 0 (boxnet, graph_color,
propositional_logic, rubiks_cube, rush_hour, measured with reasoning-gym 0.1.25), so their `solution` is not a
usable SFT target; `composite` needs sub-dataset specs. Scoring is third-party code, so this env asks
score_many for process isolation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from posttrain.envs.base import check_split, extract_answer, last_number, split_of, user_prompt
from posttrain.envs.jsonl import shuffled
from posttrain.errors import MissingExtraError
from posttrain.records import Message, Score, Task


def _reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as e:
        raise MissingExtraError("reasoning-gym", "envs") from e
    return reasoning_gym


def _difficulty(metadata: dict[str, Any]) -> int:
    """reasoning-gym has no single difficulty number; use an int `difficulty` if the dataset gives one."""
    d = metadata.get("difficulty")
    return d if isinstance(d, int) and not isinstance(d, bool) else 0


class ReasoningGym:
    """Any reasoning-gym dataset by name (args: dataset, size, seed, threshold, dataset config kwargs)."""

    name = "reasoning_gym"
    isolation = "process"

    def __init__(self, dataset: str, size: int = 1000, seed: int = 0, threshold: float = 1.0,
                 **config: Any):
        rg = _reasoning_gym()
        known = sorted(rg.factory.DATASETS)
        if dataset not in known:
            raise ValueError(f"reasoning-gym has no dataset {dataset!r}; known: {', '.join(known)}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        self.dataset, self.size, self.seed, self.threshold, self.config = dataset, size, seed, threshold, config
        self._ds = rg.create_dataset(dataset, size=size, seed=seed, **config)
        self._tasks: dict[str, list[Task]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as its arguments (the dataset object can be megabytes); a worker rebuilds it."""
        return {"dataset": self.dataset, "size": self.size, "seed": self.seed, "threshold": self.threshold,
                **self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _all_tasks(self) -> dict[str, list[Task]]:
        if self._tasks is None:
            self._tasks = {"train": [], "eval": []}
            for i in range(self.size):
                entry = self._ds[i]
                question = entry["question"]
                answer = entry["answer"]
                task = Task(id=f"{self.dataset}:{self.seed}:{i}", question=question, answer=answer,
                            solution="" if answer is None else str(answer),
                            difficulty=_difficulty(entry.get("metadata", {})), meta={"entry": entry})
                self._tasks[split_of(question)].append(task)
        return self._tasks

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        return shuffled(self._all_tasks()[split], split, seed, f"rg:{self.dataset}:{self.seed}")

    def prompt(self, task: Task) -> list[Message]:
        return user_prompt(task)

    def score(self, task: Task, completion: str) -> Score:
        """reasoning-gym's own score_answer on the completion's answer: inside <answer> tags when it has them
        (reasoning-gym's format), else the best of the whole completion, the answer as extract_answer reads it
        ('8 + 3 equals 11.' -> the line; '\\boxed{11}' -> 11) and that answer's last number (-> '11'), so the
        sentences chat models write are read the way every built-in verifier reads them."""
        if "<answer>" in completion:
            from reasoning_gym.utils import extract_answer as tagged

            candidates = [tagged(completion) or ""]
        else:
            said = extract_answer(completion)
            candidates = list(dict.fromkeys([completion.strip(), said, last_number(said) or said]))
        scored = [(float(self._ds.score_answer(answer, task.meta["entry"])), answer) for answer in candidates]
        reward, answer = max(scored, key=lambda x: x[0])
        ok = reward >= self.threshold - 1e-9
        return Score(reward, ok, {} if ok else {"got": answer[:50]})
