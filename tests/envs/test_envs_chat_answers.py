"""Answers the way a chat model writes them (issue 38, item 2): every built-in verifier reads an echoed equation, a
sentence ending in the number, \\boxed{} and 'The answer is', and every environment takes a hint and a system prompt."""

from __future__ import annotations

import json
import pickle

import pytest

from posttrain.envs.base import answer_matches, last_number
from posttrain.envs.registry import make_env
from posttrain.errors import UserError
from posttrain.records import Task

CHAT_FORMS = ["124", "55 + 69 = 124", "55 + 69 = 124.", "The answer is 124.", "So the sum is **124**.",
              "Adding them: $\\boxed{124}$", "Let me add.\n55 + 69 equals 124", "Answer: 124"]
WRONG_FORMS = ["12", "1240", "55 + 69 = 123", "124 - 1 = 123", "The answer is not known.", "-124", "124}c", "x124"]


@pytest.mark.parametrize("text, number", [("55 + 69 = 124", "124"), ("8 + 3 equals 11.", "11"), ("x = -2", "-2"),
                                          ("(-2)", "-2"), ("5-3", "3"), ("It costs $1,234", "1234"), ("+5", "5"),
                                          ("3.50 dollars", "3.50"), ("no digits", None), ("1, 234", "234"),
                                          ("14}c", None), ("l7", None), ("x2", None), ("7c", None)])
def test_last_number_reads_the_number_a_sentence_ends_with(text, number):
    assert last_number(text) == number


def test_answer_matches_numbers_by_value_and_everything_else_exactly():
    assert answer_matches("55 + 69 = 124", "124") and answer_matches("124.0", "124")
    assert not answer_matches("12", "124") and not answer_matches("5-3", "-3")
    assert answer_matches("abc", "abc") and not answer_matches("the abc", "abc")  # non-numeric: exact only


def _arithmetic_task() -> Task:
    return Task(id="55+69=", question="55+69=", answer="124", solution="124", difficulty=2)


@pytest.mark.parametrize("text", CHAT_FORMS)
def test_arithmetic_scores_chat_forms_right(text):
    env = make_env("arithmetic", {"digits": 2})
    assert env.score(_arithmetic_task(), text).correct, text


@pytest.mark.parametrize("text", WRONG_FORMS)
def test_arithmetic_scores_wrong_chat_forms_wrong(text):
    assert not make_env("arithmetic", {"digits": 2}).score(_arithmetic_task(), text).correct, text


@pytest.mark.parametrize("verifier", ["exact", "numeric"])
def test_jsonl_verifiers_score_chat_forms(verifier, tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "What is 55 + 69?", "answer": 124}) + "\n")
    env = make_env("jsonl", {"path": str(tmp_path / "t.jsonl"), "verifier": verifier})
    task = (list(env.tasks("train", 0)) + list(env.tasks("eval", 0)))[0]
    assert all(env.score(task, text).correct for text in CHAT_FORMS)
    assert not any(env.score(task, text).correct for text in WRONG_FORMS)


@pytest.mark.parametrize("dataset, config", [("chain_sum", {"min_terms": 2, "max_terms": 2}),
                                             ("basic_arithmetic", {"min_terms": 2, "max_terms": 2}),
                                             ("gsm_symbolic", {})])
def test_reasoning_gym_scores_the_sentences_chat_models_write(dataset, config):
    env = make_env("reasoning_gym", {"dataset": dataset, "size": 20, **config})
    for task in list(env.tasks("train", 0))[:5]:
        answer = str(task.answer)
        for text in (answer, f"The answer is {answer}.", f"So we get {answer}", f"\\boxed{{{answer}}}",
                     f"<answer>{answer}</answer>"):
            assert env.score(task, text).correct, (dataset, text)
        assert not env.score(task, f"The answer is {answer}1.").correct


def test_every_environment_takes_a_hint_and_a_system_prompt():
    for name, args in [("sorting", {}), ("strings", {}), ("countdown", {}), ("arithmetic", {}),
                       ("guess_number", {})]:
        env = make_env(name, {**args, "hint": "Give only the answer.", "system_prompt": "Be brief."})
        task = next(iter(env.tasks("train", 0)))
        messages = env.prompt(task)
        assert messages[0] == {"role": "system", "content": "Be brief."}, name
        assert messages[-1]["role"] == "user" and messages[-1]["content"].endswith("\nGive only the answer."), name
        plain = make_env(name, args).prompt(task)
        assert messages[-1]["content"] == f"{plain[-1]['content']}\nGive only the answer."


def test_an_instructed_environment_keeps_its_verifier_and_isolation_and_pickles():
    env = make_env("countdown", {"system_prompt": ""})  # an empty system prompt replaces a template's default
    inner = make_env("countdown", {})
    task = next(iter(env.tasks("train", 0)))
    assert env.prompt(task)[0] == {"role": "system", "content": ""}
    assert env.isolation == inner.isolation and env.name == "countdown"
    assert env.score(task, task.solution).correct
    again = pickle.loads(pickle.dumps(env))
    assert again.prompt(task) == env.prompt(task) and again.score(task, task.solution).correct


def test_a_bad_hint_or_an_unknown_argument_is_an_error_naming_it():
    with pytest.raises(UserError, match="hint must be a string"):
        make_env("sorting", {"hint": 3})
    with pytest.raises(UserError, match="takes no argument 'hints'"):
        make_env("sorting", {"hints": "x"})
