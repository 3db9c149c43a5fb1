"""reasoning-gym, math-verify and JSONL adapters, offline."""

from __future__ import annotations

import json
import time

import pytest

from posttrain.envs import make_env
from posttrain.envs.mathverify import MathVerifier
from posttrain.envs.scoring import score_many
from posttrain.errors import UserError

pytest.importorskip("reasoning_gym")
pytest.importorskip("math_verify")

RG_DATASETS = ["basic_arithmetic", "leg_counting", "spell_backward", "word_sorting", "chain_sum",
               "letter_counting"]


@pytest.mark.parametrize("dataset", RG_DATASETS)
def test_reasoning_gym_gold_scores_one_wrong_scores_zero_and_splits_are_disjoint(dataset):
    env = make_env("reasoning_gym", {"dataset": dataset, "size": 120, "seed": 3})
    train, evals = list(env.tasks("train", 0)), list(env.tasks("eval", 0))
    assert len(train) + len(evals) == 120 and evals  # finite, and both splits non-empty
    assert not {t.id for t in train} & {t.id for t in evals}
    assert not {t.question for t in train} & {t.question for t in evals}
    assert list(env.tasks("train", 0)) == train and list(env.tasks("train", 1)) != train
    for t in train[:40]:
        s = env.score(t, t.solution)
        assert (s.reward, s.correct) == (1.0, True), (t.question, t.solution, s)
        assert env.score(t, f"<think>easy</think><answer>{t.solution}</answer>").correct
        wrong = env.score(t, "@@@")
        assert not wrong.correct and wrong.reward < 0.5


def test_reasoning_gym_through_process_isolation_and_config_kwargs():
    env = make_env("reasoning_gym", {"dataset": "chain_sum", "size": 40, "min_terms": 2, "max_terms": 2})
    tasks = list(env.tasks("train", 0))[:10]
    assert all(t.question.count("+") + t.question.count("-") == 1 for t in tasks)  # the config reached it
    scores = score_many(env, tasks * 2, [t.solution for t in tasks] + ["nope"] * 10, timeout_s=30)
    assert [s.reward for s in scores] == [1.0] * 10 + [0.0] * 10


def test_reasoning_gym_bad_names_are_errors():
    with pytest.raises(UserError, match="no dataset 'no_such_set'.*chain_sum"):
        make_env("reasoning_gym", {"dataset": "no_such_set"})
    with pytest.raises(UserError, match="bogus_option"):
        make_env("reasoning_gym", {"dataset": "chain_sum", "bogus_option": 1})


@pytest.fixture
def math_file(tmp_path):
    rows = [{"question": "Half of one?", "answer": "1/2"}, {"prompt": "x if 2x=6", "answer": "3"},
            {"prompt": "frac", "answer": "\\frac{3}{4}", "split": "eval"}, {"prompt": "int", "answer": 7}]
    path = tmp_path / "math.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_math_env_accepts_equivalent_forms(math_file):
    env = make_env("math", {"path": str(math_file)})
    tasks = {t.question: t for split in ("train", "eval") for t in env.tasks(split, 0)}
    assert len(tasks) == 4 and "frac" in {t.question for t in env.tasks("eval", 0)}
    half = tasks["Half of one?"]
    assert env.score(half, "\\boxed{1/2}").correct and env.score(half, "so it is 0.5").correct
    assert env.score(half, "\\boxed{\\frac{1}{2}}").correct
    assert not env.score(half, "\\boxed{0.6}").correct and not env.score(half, "").correct
    assert env.score(tasks["frac"], "0.75").correct
    for t in tasks.values():
        assert env.score(t, t.solution).correct, t


def test_math_verifier_hard_timeout_kills_a_hang_and_recovers():
    hanging = MathVerifier(timeout_s=0.5, target="envs_helpers:hang")
    start = time.monotonic()
    s = hanging.verify("1", "1")
    assert s == s.__class__(0.0, False, s.info) and s.info["error"] == "timeout"
    assert time.monotonic() - start < 10
    assert not hanging._worker.alive  # killed, not left running
    hanging.close()
    real = MathVerifier(timeout_s=10)
    assert real.verify("0.5", "\\boxed{1/2}").correct
    real.close()


def test_jsonl_verifiers(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"p{i}", "answer": a, "id": f"r{i}"} for i, a in enumerate(["Paris", "1,000.5", "a b"])]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    def everything(env):
        return {t.id: t for s in ("train", "eval") for t in env.tasks(s, 0)}

    exact = make_env("jsonl", {"path": str(path)})
    t = everything(exact)
    assert exact.score(t["r0"], "thinking\nParis").correct and not exact.score(t["r0"], "paris").correct
    normalized = make_env("jsonl", {"path": str(path), "verifier": "normalized"})
    assert normalized.score(t["r2"], "  A   B ").correct and not normalized.score(t["r2"], "ab").correct
    numeric = make_env("jsonl", {"path": str(path), "verifier": "numeric", "tolerance": 1e-6})
    assert numeric.score(t["r1"], "so 1000.5000001").correct and not numeric.score(t["r1"], "1000.6").correct
    assert numeric.score(t["r1"], "1,000.5").correct and not numeric.score(t["r1"], "no number").correct
    assert numeric.score(t["r0"], "3").info["error"] == "bad_answer"
    for env in (exact, normalized):
        assert all(env.score(task, task.solution).correct for task in t.values())


@pytest.mark.parametrize(("content", "message"), [
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n', r"bad\.jsonl:2: invalid JSON"),
    ('{"prompt": "a", "answer": "1"}\n\n[1, 2]\n', r"bad\.jsonl:3: expected a JSON object"),
    ('{"answer": "1"}\n', r"bad\.jsonl:1: needs a non-empty string 'prompt'"),
    ('{"prompt": "a"}\n', r"bad\.jsonl:1: needs an 'answer'"),
    ('{"prompt": "a", "answer": "1", "split": "holdout"}\n', r"bad\.jsonl:1: split 'holdout'"),
    ("", r"bad\.jsonl: no tasks \(the file is empty\)"),
    ("\n  \n", r"bad\.jsonl: no tasks"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        make_env("jsonl", {"path": str(path)})


def test_jsonl_missing_file_and_bad_verifier(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl'?: file not found"):
        make_env("jsonl", {"path": str(tmp_path / "nope.jsonl")})
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    with pytest.raises(UserError, match="verifier must be one of"):
        make_env("jsonl", {"path": str(good), "verifier": "fuzzy"})


def test_jsonl_split_field_and_order_is_deterministic(tmp_path):
    path = tmp_path / "s.jsonl"
    rows = [{"prompt": f"p{i}", "answer": str(i), "split": "test" if i % 4 == 0 else "train"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    env = make_env("jsonl", {"path": str(path)})
    evals, train = list(env.tasks("eval", 0)), list(env.tasks("train", 0))
    assert sorted(int(t.answer) for t in evals) == list(range(0, 40, 4)) and len(train) == 30
    assert list(env.tasks("train", 0)) == train and list(env.tasks("train", 1)) != train
