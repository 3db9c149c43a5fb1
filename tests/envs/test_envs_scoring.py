"""score_many: a raising, hanging, crashing or NaN-returning verifier costs only its own sample."""

from __future__ import annotations

import itertools
import time

import pytest
from envs_helpers import Faulty, make_tasks

from posttrain.envs import make_env
from posttrain.envs.scoring import ScoreErrors, score_many
from posttrain.errors import UserError
from posttrain.records import Score

BAD = ["raise", "nan", "inf", "str", "none"]


@pytest.mark.parametrize("isolation", ["inline", "thread", "process"])
def test_each_failure_costs_only_its_sample(isolation):
    tasks = make_tasks(8)
    completions = ["0", "raise", "2", "nan", "inf", "5", "str", "none"]
    scores = score_many(Faulty(isolation), tasks, completions, timeout_s=5, failure_reward=-1.0)
    assert [s.reward for s in scores] == [1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0]
    assert [s.info.get("error") for s in scores] == [None, "exception", None, "bad_reward", "bad_reward", None,
                                                     "bad_reward", "bad_reward"]
    assert "ZeroDivisionError: verifier bug on purpose" in scores[1].info["detail"]
    assert "nan" in scores[3].info["detail"]
    errors = ScoreErrors.of(scores)
    assert errors.by_reason == {"bad_reward": 4, "exception": 1} and errors.failed == 5
    assert errors.metrics() == {"score/error_frac": 5 / 8, "score/error/bad_reward": 4.0,
                                "score/error/exception": 1.0}
    assert str(errors) == "5/8 failed (bad_reward=4, exception=1)"


def test_process_isolation_kills_a_hanging_verifier_and_recovers():
    tasks = make_tasks(6)
    completions = ["0", "hang", "2", "3", "die", "5"]
    start = time.monotonic()
    scores = score_many(Faulty("process"), tasks, completions, timeout_s=1.0, workers=2)
    elapsed = time.monotonic() - start
    assert [s.correct for s in scores] == [True, False, True, True, False, True]
    assert scores[1].info["error"] == "timeout" and scores[4].info["error"] == "crash"
    assert elapsed < 8  # one timeout (1 s) plus worker restarts, never the 60 s sleep
    # the pool is reused and still healthy
    again = score_many(Faulty("process"), tasks[:2], ["0", "1"], timeout_s=5)
    assert [s.reward for s in again] == [1.0, 1.0]


def test_thread_isolation_stops_waiting_at_the_timeout():
    tasks = make_tasks(4)
    start = time.monotonic()
    scores = score_many(Faulty("thread", sleep_s=3.0), tasks, ["hang", "hang", "2", "3"], timeout_s=0.3)
    assert time.monotonic() - start < 2.0
    assert [s.info.get("error") for s in scores] == ["timeout", "timeout", None, None]
    assert [s.reward for s in scores] == [0.0, 0.0, 1.0, 1.0]


def test_inline_overrun_is_still_reported_as_timeout():
    scores = score_many(Faulty("inline", sleep_s=0.2), make_tasks(2), ["hang", "1"], timeout_s=0.1)
    assert scores[0].info["error"] == "timeout" and "could not be interrupted" in scores[0].info["detail"]
    assert scores[1] == Score(1.0, True)


def test_inline_builtins_are_fast():
    env = make_env("arithmetic")
    tasks = list(itertools.islice(env.tasks("train", 0), 2000))
    start = time.perf_counter()
    scores = score_many(env, tasks, [t.solution for t in tasks])
    rate = len(tasks) / (time.perf_counter() - start)
    assert all(s.correct for s in scores)
    assert rate > 5000, f"{rate:.0f} scores/s"


def test_unpicklable_env_and_bad_arguments_are_clear_errors():
    env = Faulty("process")
    env.callback = lambda: None  # lambdas do not pickle
    with pytest.raises(UserError, match="cannot be pickled.*declare `isolation"):
        score_many(env, make_tasks(1), ["0"])
    with pytest.raises(ValueError, match="1 tasks but 2 completions"):
        score_many(Faulty("inline"), make_tasks(1), ["0", "1"])
    with pytest.raises(ValueError, match="isolation"):
        score_many(Faulty("inline"), make_tasks(1), ["0"], isolation="gpu")
    assert score_many(Faulty("process"), [], []) == []
