"""Built-in procedural environments: gold solutions verify, wrong answers do not, difficulty moves the
distribution, splits never overlap, generation is deterministic."""

from __future__ import annotations

import itertools
import re
import statistics

import pytest

from posttrain.envs import make_env
from posttrain.envs.arithmetic import worked_solution
from posttrain.envs.countdown import ExprError, evaluate
from posttrain.envs.strings import OPS
from posttrain.records import Task

BUILTINS = {
    "arithmetic": {"digits": [1, 4], "ops": "+-*"},
    "arithmetic_worked": {"digits": [1, 4], "ops": "+-*", "worked": True},
    "strings": {"depth": [1, 3]},
    "strings_worked": {"depth": [1, 4], "worked": True},
    "countdown": {"count": [2, 5]},
    "sorting": {"order": "both"},
    "sorting_words": {"items": "words", "order": "both"},
}


def _env(key: str):
    return make_env(key.split("_")[0], BUILTINS[key])


def _take(env, split: str, n: int, seed: int = 0) -> list[Task]:
    return list(itertools.islice(env.tasks(split, seed), n))


@pytest.mark.parametrize("key", sorted(BUILTINS))
def test_gold_solutions_score_one_and_wrong_answers_zero(key):
    env = _env(key)
    tasks = _take(env, "train", 1000)
    assert len({t.id for t in tasks}) > 500  # a varied sample, not one problem repeated
    for t in tasks:
        s = env.score(t, t.solution)
        assert (s.reward, s.correct) == (1.0, True), (t, s)
        assert t.solution.isascii() and len(t.solution) < 200 and len(t.question) < 60
        assert env.score(t, t.solution + "1").reward == 0.0  # the final line changed
        assert env.score(t, "").reward == 0.0
        assert env.prompt(t) == [{"role": "user", "content": t.question}]


@pytest.mark.parametrize("key", sorted(BUILTINS))
def test_train_and_eval_never_overlap_and_generation_is_deterministic(key):
    env = _env(key)
    train, evals = _take(env, "train", 3000), _take(env, "eval", 300)
    assert not {t.id for t in train} & {t.id for t in evals}
    assert not {t.question for t in train} & {t.question for t in evals}
    assert _take(env, "eval", 50) == evals[:50]
    assert _take(env, "train", 50, seed=1) != train[:50]
    with pytest.raises(ValueError, match="unknown split"):
        next(env.tasks("test", 0))


@pytest.mark.parametrize(("name", "knob", "easy", "hard", "measure"), [
    ("arithmetic", "digits", 1, 4, lambda t: len(t.answer)),
    ("strings", "depth", 1, 4, lambda t: t.question.count("(")),
    ("countdown", "count", 2, 5, lambda t: len(t.meta["numbers"])),
    ("sorting", "length", 2, 8, lambda t: len(t.answer.split())),
])
def test_difficulty_knob_moves_the_distribution(name, knob, easy, hard, measure):
    lo = [measure(t) for t in _take(make_env(name, {knob: easy}), "train", 300)]
    hi = [measure(t) for t in _take(make_env(name, {knob: hard}), "train", 300)]
    assert statistics.mean(hi) > statistics.mean(lo) + 1
    lo_tasks = _take(make_env(name, {knob: easy}), "train", 50)
    assert {t.difficulty for t in lo_tasks} == {easy}


def test_arithmetic_known_answers_and_worked_lines():
    env = make_env("arithmetic", {"ops": "+-*"})
    t = Task(id="x", question="47+85=", answer="132", solution="132")
    assert env.score(t, "132").correct and env.score(t, "work\n 132 \n").correct
    assert not env.score(t, "133").correct and not env.score(t, "132\n0").correct
    assert worked_solution(47, "+", 85) == "7+5+0=12\n4+8+1=13\n132"
    assert worked_solution(52, "-", 17) == "12-7-0=5\n5-1-1=3\n35"
    assert worked_solution(17, "-", 52) == "-(52-17)\n12-7-0=5\n5-1-1=3\n-35"
    assert worked_solution(12, "*", 34) == "12*4=48\n12*30=360\n408"


def test_arithmetic_asked_as_a_question_holds_out_the_same_problems_and_scores_chat_answers():
    bare = make_env("arithmetic", {"digits": [1, 3], "ops": "+-*"})
    asked = make_env("arithmetic", {"digits": [1, 3], "ops": "+-*", "phrasing": "question"})
    for split in ("train", "eval"):
        b, q = (list(itertools.islice(e.tasks(split, 0), 50)) for e in (bare, asked))
        assert [t.id for t in b] == [t.id for t in q] and [t.answer for t in b] == [t.answer for t in q]
    task = next(t for t in asked.tasks("eval", 0) if "+" in t.id and t.difficulty == 2)
    a, b = task.id[:-1].split("+")
    assert task.question == f"What is {a} + {b}?"
    total = str(int(a) + int(b))
    for answer in (total, f"{a} + {b} = {total}", f"The answer is {total}.", f"{task.id}{total}"):
        assert asked.score(task, answer).correct, answer
    assert not asked.score(task, f"The answer is {int(total) + 1}.").correct
    easier = asked.easier(task)
    assert easier is not None and easier.question.startswith("What is ") and easier.difficulty == 1
    times = next(t for t in asked.tasks("train", 0) if "*" in t.id)
    assert " times " in times.question
    with pytest.raises(Exception, match="phrasing"):
        make_env("arithmetic", {"phrasing": "words"})


def test_arithmetic_as_a_word_problem_names_both_numbers_reads_the_same_every_time_and_scores_chat_answers():
    bare = make_env("arithmetic", {"digits": [1, 3], "ops": "+*"})
    stories = make_env("arithmetic", {"digits": [1, 3], "ops": "+*", "phrasing": "story"})
    b, s = (list(itertools.islice(e.tasks("eval", 0), 60)) for e in (bare, stories))
    assert [t.id for t in b] == [t.id for t in s] and [t.answer for t in b] == [t.answer for t in s]
    for task in s:
        a, c = re.fullmatch(r"(\d+)[+*](\d+)=", task.id).groups()
        assert re.findall(r"\d+", task.question) == [a, c] and task.question.endswith("?")
    assert len({t.question.split()[0] for t in s}) > 2  # several templates and names, not one sentence
    assert [t.question for t in s] == [t.question for t in itertools.islice(stories.tasks("eval", 0), 60)]
    task = next(t for t in s if "+" in t.id)
    total = task.answer
    for answer in (total, f"Mia has {total} apples now.", f"The answer is {total}.", rf"\boxed{{{total}}}"):
        assert stories.score(task, answer).correct, answer
    assert not stories.score(task, str(int(total) + 1)).correct
    with pytest.raises(Exception, match="story"):
        make_env("arithmetic", {"ops": "+-", "phrasing": "story"})


def test_strings_ops_and_composition_answer():
    assert OPS["reverse"]("abc") == "cba" and OPS["rotl"]("abc") == "bca" and OPS["rotr"]("abc") == "cab"
    assert OPS["devowel"]("banana") == "bnn" and OPS["dup"]("ab") == "abab" and OPS["swapcase"]("aB") == "Ab"
    env = make_env("strings", {"depth": 3, "ops": ["reverse", "sort"], "worked": True})
    for t in _take(env, "train", 50):
        inner = t.meta["input"]
        for op in reversed(t.meta["ops"]):
            inner = OPS[op](inner)
        assert t.answer == inner and t.solution.splitlines()[-1] == inner
        assert len(t.solution.splitlines()) == 3  # two intermediate steps, then the answer
    with pytest.raises(Exception, match="unknown"):
        make_env("strings", {"ops": ["reverse", "explode"]})


def test_countdown_verifier_parses_safely():
    t = Task(id="x", question="make 24 with 2 3 4:", answer="24", solution="2*3*4",
             meta={"numbers": [2, 3, 4], "target": 24})
    env = make_env("countdown")
    assert env.score(t, "(4-2)*3*4").info["reason"] == "numbers"  # 4 used twice
    assert env.score(t, "4*3*2").correct and env.score(t, "4*(3*2) = 24").correct
    assert env.score(t, "2*3+4").info == {"reason": "value", "value": 10, "got": "2*3+4"}
    assert env.score(t, "__import__('os').system('x')").info["reason"] == "parse"
    assert env.score(t, "2**3").info["reason"] == "parse"
    assert env.score(t, "9" * 5000).info["reason"] == "parse"
    assert evaluate("8/4-1") == (1, [8, 4, 1]) and evaluate("(2+3)*4") == (20, [2, 3, 4])
    for bad in ("7/2", "1/0", "-3", "2+", "(2", "2)"):
        with pytest.raises(ExprError):
            evaluate(bad)


def test_sorting_accepts_commas_and_rejects_wrong_order():
    env = make_env("sorting")
    t = Task(id="x", question="sort(5 3 9)=", answer="3 5 9", solution="3 5 9")
    assert env.score(t, "3, 5, 9").correct and env.score(t, "3 5 9").correct
    assert not env.score(t, "9 5 3").correct and not env.score(t, "3 5").correct
