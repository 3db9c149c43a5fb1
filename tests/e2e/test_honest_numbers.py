"""Numbers that say what they are (issue 36): an evaluation counts each distinct problem once and says when fewer
exist than asked; a data file's task order depends on its rows, not its path or format; `posttrain fit` warns
about parameters at the edge of their search box."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from posttrain.envs.base import split_of
from posttrain.envs.jsonl import Jsonl
from posttrain.envs.registry import make_env
from posttrain.evals.evaluate import distinct_tasks, evaluate
from posttrain.records import Score
from posttrain.science.fit import FitResult, bound_warnings, fit_curve


# -- 1. evaluation draws distinct problems ---------------------------------------------------------------------
class _Tokenizer:
    bos_token_id = None

    def __call__(self, text, **_):
        return SimpleNamespace(input_ids=[ord(ch) % 50 for ch in text])


class _Engine:
    def generate(self, prompts, params):
        return [SimpleNamespace(text="0") for _ in prompts]


def test_eval_asked_for_more_problems_than_exist_evaluates_the_distinct_ones_and_says_so():
    env = make_env("arithmetic", {"digits": 1})
    ops = "+"  # the default
    exist = {f"{a}{op}{b}=" for a in range(10) for b in range(10) for op in ops if split_of(f"{a}{op}{b}=") == "eval"}
    result = evaluate(_Engine(), _Tokenizer(), env, problems=200, samples=2, ks=[1], temperature=1.0, top_p=1.0,
                      max_new_tokens=4, seed=0, chat_template=False,
                      score=lambda tasks, texts: [Score(0.0, False, {}) for _ in tasks])
    assert result["problems"] == len(exist) < 200 and result["problems_requested"] == 200
    ids = [row["id"] for row in result["per_problem"]]
    assert len(ids) == len(set(ids)) == len(exist) and set(ids) == exist
    (warning,) = result["warnings"]
    assert "arithmetic" in warning and "200" in warning and f"only {len(exist)} distinct" in warning
    json.dumps(result)  # the eval JSON carries it all


def test_eval_with_enough_problems_gives_no_warning_and_distinct_tasks_stops_at_n():
    env = make_env("arithmetic", {"digits": 3})
    tasks = distinct_tasks(env.tasks("eval", 0), 40)
    assert len(tasks) == 40 and len({(t.question, t.answer) for t in tasks}) == 40
    result = evaluate(_Engine(), _Tokenizer(), env, problems=40, samples=1, ks=[1], temperature=1.0, top_p=1.0,
                      max_new_tokens=4, seed=0, chat_template=False, greedy_only=True,
                      score=lambda tasks, texts: [Score(0.0, False, {}) for _ in tasks])
    assert result["problems"] == result["problems_requested"] == 40 and "warnings" not in result


def test_eval_reports_the_mean_reward_and_a_custom_rewards_numeric_diagnostics():
    """A shaped reward is a number of its own beside pass@1 (reward_mean), and the info fields an environment
    declares as metrics (info_metrics) are averaged over the samples that carry a number there (eval/info/<key>);
    undeclared fields, booleans and strings are not."""
    from posttrain.evals.evaluate import headline_metrics

    env = make_env("arithmetic", {"digits": 3})
    env.info_metrics = ("extra_chars", "only_right", "checked", "got", "never")
    calls = iter(range(10_000))

    def score(tasks, texts):  # every other sample is right with 2 extra characters: reward 1 - 0.1
        out = []
        for _ in tasks:
            i = next(calls)
            right = i % 2 == 0
            info = {"extra_chars": 2 if right else 0, "checked": True, "got": "x"} | ({"only_right": 1} if right else {})
            out.append(Score(0.9 if right else 0.0, right, info))
        return out

    result = evaluate(_Engine(), _Tokenizer(), env, problems=5, samples=4, ks=[1], temperature=1.0, top_p=1.0,
                      max_new_tokens=4, seed=0, chat_template=False, score=score)
    assert result["mean@n"]["mean"] == pytest.approx(0.5)
    assert result["reward_mean"]["mean"] == pytest.approx(0.45)  # 0.5 x 0.9
    assert result["info"] == {"extra_chars": pytest.approx(1.0), "only_right": 1.0}  # only_right: over its carriers
    env.info_metrics = ()
    assert "info" not in evaluate(_Engine(), _Tokenizer(), env, problems=5, samples=4, ks=[1], temperature=1.0,
                                  top_p=1.0, max_new_tokens=4, seed=0, chat_template=False, score=score)
    headline = headline_metrics(result)
    assert headline["eval/reward_mean"] == pytest.approx(0.45) and headline["eval/info/extra_chars"] == 1.0


def test_the_summary_table_shows_reward_mean_only_where_it_is_not_the_verdict():
    from posttrain.cli import summary_rows

    plain = {"sft": {"eval/pass@1": 0.5, "eval/mean@n": 0.5, "eval/reward_mean": 0.5},
             "rl": {"eval/pass@1": 0.7, "eval/mean@n": 0.7, "eval/reward_mean": 0.7}}
    assert summary_rows(plain)[0] == ["pass@1"]
    shaped = {**plain, "rl": {"eval/pass@1": 0.7, "eval/mean@n": 0.7, "eval/reward_mean": 0.6}}
    columns, rows = summary_rows(shaped)
    assert columns == ["pass@1", "reward_mean"] and rows[1] == ("rl", ["0.700", "0.600"])


def test_distinct_tasks_dedups_by_content_and_ends_with_a_finite_stream():
    t = SimpleNamespace
    stream = [t(question="q1", answer="1"), t(question="q1", answer="1"), t(question="q1", answer="2"),
              t(question="q2", answer="1")]
    assert [(x.question, x.answer) for x in distinct_tasks(iter(stream), 10)] == [("q1", "1"), ("q1", "2"),
                                                                                  ("q2", "1")]


# -- 2. task order from content, not path or format -------------------------------------------------------------
def test_same_rows_as_jsonl_csv_parquet_or_a_copy_give_the_same_task_order(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"prompt": f"what is {i} + {i}?", "answer": str(2 * i), "split": "train" if i % 4 else "eval"}
            for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (tmp_path / "b.csv").open("w") as f:
        f.write("prompt,answer,split\n" + "".join(f"{r['prompt']},{r['answer']},{r['split']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "a.jsonl", tmp_path / "elsewhere" / "renamed.jsonl")
    paths = ["a.jsonl", "b.csv", "c.parquet", "elsewhere/renamed.jsonl"]
    for split in ("train", "eval"):
        for seed in (0, 7):
            orders = {p: [(t.question, t.answer) for t in Jsonl(str(tmp_path / p)).tasks(split, seed)] for p in paths}
            first = orders["a.jsonl"]
            assert all(order == first for order in orders.values()), (split, seed)
    # still seeded by the run seed, and the file order is not kept
    train0 = [t.question for t in Jsonl(str(tmp_path / "a.jsonl")).tasks("train", 0)]
    train7 = [t.question for t in Jsonl(str(tmp_path / "a.jsonl")).tasks("train", 7)]
    assert train0 != train7 and sorted(train0) == sorted(train7)


# -- 3. fit warns about parameters at their box bounds --------------------------------------------------------
def _fit(params, box, fitted_range=(1.0, 100.0)) -> FitResult:
    return FitResult(form="sigmoid", params=params, ci={k: (v, v) for k, v in params.items()},
                     fitted_range=fitted_range, n_points=10, rmse=0.0, box=box)


def test_bound_warnings_name_each_parameter_at_a_bound_and_a_midpoint_outside_the_data():
    params = {"R0": 0.1, "A": 1.0, "B": 0.05, "C_mid": 5000.0}
    box = {"R0": (0.0, 1.0), "A": (0.0, 1.0), "B": (0.05, 10.0), "C_mid": (0.01, 10000.0)}
    out = bound_warnings(params, box, log_params=("C_mid",), midpoint="C_mid", fitted_range=(1.0, 100.0))
    assert len(out) == 3
    assert any(line.startswith("A = 1 ") and "upper bound 1" in line for line in out)
    assert any(line.startswith("B = 0.05 ") and "lower bound 0.05" in line for line in out)
    assert any(line.startswith("C_mid = 5000 ") and "outside" in line and "[1, 100]" in line for line in out)
    inside = {"R0": 0.1, "A": 0.8, "B": 2.0, "C_mid": 30.0}
    assert bound_warnings(inside, box, log_params=("C_mid",), midpoint="C_mid", fitted_range=(1.0, 100.0)) == []
    # a log-scale parameter is judged on its log: 0.02 is far (in decades) from the lower bound 0.01
    assert bound_warnings({"C_mid": 0.02}, {"C_mid": (0.01, 1e4)}, log_params=("C_mid",)) == []
    assert len(bound_warnings({"C_mid": 0.01}, {"C_mid": (0.01, 1e4)}, log_params=("C_mid",))) == 1
    assert _fit(params, box).to_dict()["warnings"] == []  # hand-made: warnings are what fit_curve computed


def test_a_sigmoid_fit_still_rising_at_the_data_edge_warns_and_records_it():
    # still rising steeply at the last point, which reaches R = 1: the asymptote A sits on its upper bound 1
    C = np.geomspace(1.0, 100.0, 12)
    R = np.clip(0.05 + 0.5 * np.log10(C) / 2.0, 0, 1) ** 0.5
    R[-1] = 1.0
    fit = fit_curve(C, R, "sigmoid", n_boot=0)
    assert fit.params["A"] == pytest.approx(1.0) and fit.to_dict()["warnings"] == list(fit.warnings)
    assert any(line.startswith("A = 1 ") and "upper bound 1" in line for line in fit.warnings)
    for line in fit.warnings:
        name = line.split(" = ")[0]
        assert name in fit.params
        value = fit.params[name]
        lo, hi = fit.box.get(name, (np.nan, np.nan))
        at_bound = np.isclose(value, lo, rtol=1e-2) or np.isclose(value, hi, rtol=1e-2)
        outside = name == "C_mid" and not fit.fitted_range[0] <= value <= fit.fitted_range[1]
        assert at_bound or outside, line


def test_a_run_says_in_its_log_when_its_eval_has_fewer_distinct_problems_than_asked(tmp_path):
    from posttrain.config import validate
    from posttrain.runner import run

    cfg = validate({"recipe": "sft", "name": "t", "output_dir": str(tmp_path), "threads": 1,
                    "model": {"path": "tiny-test"}, "env": {"name": "arithmetic", "args": {"digits": 1}},
                    "sft": {"steps": 1, "batch_size": 4, "micro_batch_size": 4},
                    "eval": {"problems": 200, "samples": 1, "ks": [1], "max_new_tokens": 2, "at_start": False}},
                   "test")
    run(cfg)
    result = json.loads((cfg.run_dir / "eval" / "sft.json").read_text())
    assert result["problems"] < 200 and result["problems_requested"] == 200
    log = (cfg.run_dir / "run.log").read_text()
    assert f"only {result['problems']} distinct exist" in log and "warning: warning:" not in log
