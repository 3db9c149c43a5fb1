"""The adaptive task samplers (data/curricula.py) on hand-made histories, their state round-trips, rescue, the
mixture environment ([[env.sources]]) and transfer suites ([[eval.suites]]) in the config."""

import copy
import tomllib

import pytest

from posttrain.config import validate
from posttrain.data.samplers import SAMPLERS, GroupOutcome
from posttrain.envs import make_env
from posttrain.errors import UserError
from posttrain.records import Task


class TableEnv:
    """n tasks t0..t{n-1}; difficulty = index mod 3."""

    name = "table"

    def __init__(self, n=10):
        self.n = n

    def tasks(self, split, seed):
        return iter([Task(f"t{i}", f"q{i}", "a", "a", difficulty=i % 3) for i in range(self.n)])


def outcome(task, passes, of=4):
    return GroupOutcome(task, tuple([1.0] * passes + [0.0] * (of - passes)), tuple([True] * passes + [False] * (of - passes)))


def feed(sampler, tasks, rates, step):
    sampler.observe([outcome(t, rates[t.id]) for t in tasks], step=step)


def test_the_curricula_register_on_the_first_lookup_not_at_import():
    # data/samplers.py no longer imports data/curricula.py (which imports it back): the registry imports it
    import subprocess
    import sys

    code = ("import sys; from posttrain.data.samplers import SAMPLERS; "
            "print('posttrain.data.curricula' in sys.modules, SAMPLERS.names())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False ['dump', 'no_positive_resampling', 'pcl', 'pools', 'uniform']"


def test_pools_draw_by_ratio_from_the_pools_their_pass_rates_put_them_in():
    s = SAMPLERS.get("pools")(TableEnv(10), 0, window=1, ratios={"new": 0.5, "learnable": 0.5})
    first = s.next(4)
    assert [t.id for t in first] == ["t0", "t1", "t2", "t3"]  # nothing seen yet: all new, in stream order
    feed(s, first, {"t0": 4, "t1": 2, "t2": 0, "t3": 1}, step=1)
    assert s.pools() == {"easy": ["t0"], "learnable": ["t1", "t3"], "hard": ["t2"]}
    second = s.next(4)
    ids = [t.id for t in second]
    assert ids[:2] == ["t4", "t5"] and sorted(ids[2:]) == ["t1", "t3"]  # 2 new + both learnable
    assert s.metrics()["curriculum/pool_learnable"] == 2 and s.metrics()["curriculum/drawn_new"] == 2
    # t1 is solved every time now: it moves to the easy pool, which has ratio 0
    feed(s, second, {"t4": 2, "t5": 0, "t1": 4, "t3": 3}, step=2)
    assert s.pools()["easy"] == ["t0", "t1"] and s.pools()["learnable"] == ["t3", "t4"]


def test_pools_fall_back_to_seen_prompts_once_the_pool_is_used_up():
    s = SAMPLERS.get("pools")(TableEnv(3), 0, window=1, ratios={"new": 1.0})
    tasks = s.next(3)
    feed(s, tasks, {"t0": 4, "t1": 2, "t2": 0}, step=1)
    again = s.next(2)
    assert len(again) == 2 and {t.id for t in again} <= {"t0", "t1", "t2"}


def test_no_positive_resampling_retires_prompts_that_stayed_solved():
    s = SAMPLERS.get("no_positive_resampling")(TableEnv(4), 0, threshold=1.0, window=2)
    tasks = s.next(4)
    feed(s, tasks, {"t0": 4, "t1": 4, "t2": 1, "t3": 0}, step=1)
    epoch2 = s.next(4)
    assert sorted(t.id for t in epoch2) == ["t0", "t1", "t2", "t3"]  # one solved visit is not yet window = 2
    feed(s, epoch2, {"t0": 4, "t1": 3, "t2": 1, "t3": 0}, step=2)
    assert s.retired("t0") and not s.retired("t1")
    epoch3 = s.next(3)
    assert sorted(t.id for t in epoch3) == ["t1", "t2", "t3"] and s.metrics()["curriculum/retired"] == 1
    feed(s, epoch3, {"t1": 4, "t2": 4, "t3": 4}, step=3)
    feed(s, epoch3, {"t1": 4, "t2": 4, "t3": 4}, step=4)
    with pytest.raises(UserError, match="all 4 tasks are retired"):
        s.next(1)


def test_pcl_picks_the_prompts_its_value_model_puts_nearest_the_target():
    s = SAMPLERS.get("pcl")(TableEnv(12), 0, target=0.5, candidates=3, known_frac=0.0, lr=1.0, dim=64)
    # teach the value model: difficulty 0 always solved, 1 half the time, 2 never
    rates = {f"t{i}": {0: 4, 1: 2, 2: 0}[i % 3] for i in range(12)}
    for step in range(1, 40):
        batch = s.next(4)
        feed(s, batch, rates, step)
    picked = s.next(4)
    assert all(t.difficulty == 1 for t in picked), [t.id for t in picked]
    assert abs(s.predict(picked[0]) - 0.5) < 0.1
    feed(s, picked, rates, 40)
    m = s.metrics()
    assert m["curriculum/realised_mean"] == pytest.approx(0.5)
    assert m["curriculum/pred_abs_err"] < 0.1 and abs(m["curriculum/pred_mean"] - 0.5) < 0.1


def test_dump_prefers_the_arm_whose_groups_have_reward_variance():
    s = SAMPLERS.get("dump")(TableEnv(300), 0, arms="difficulty", c=0.1, temperature=0.05)
    rates = {f"t{i}": {0: 4, 1: 2, 2: 0}[i % 3] for i in range(300)}
    for step in range(1, 10):
        feed(s, s.next(6), rates, step)
    probs = s.probabilities()
    assert probs["1"] > 0.95  # |advantage| 0.5 against 0 for the always / never solved arms
    assert s.values["0"][-1] == 0.0 and s.values["1"][-1] == pytest.approx(0.5)
    assert s.metrics()["curriculum/arm_value/1"] == pytest.approx(0.5)
    assert sum(t.difficulty == 1 for t in s.next(20)) >= 18


class DigitsEnv(TableEnv):
    def easier(self, task):
        d = task.difficulty - 1
        return None if d < 0 else Task(f"{task.id}-easy{d}", task.question[:-1] or "q", "a", "a", difficulty=d)


def test_rescue_replaces_a_never_solved_prompt_by_its_easier_variant():
    s = SAMPLERS.get("pools")(DigitsEnv(3), 0, window=1, rescue_after=2, ratios={"hard": 1.0, "new": 0.0})
    tasks = s.next(3)
    for step in (1, 2):
        feed(s, tasks, {"t0": 4, "t1": 2, "t2": 0}, step=step)
    tasks = s.next(1)  # the hard pool: t2 (never solved twice) -> its variant
    assert [t.id for t in tasks] == ["t2-easy1"] and tasks[0].meta["rescued_from"] == "t2"
    assert s.metrics()["curriculum/rescued"] == 1 and s.rescued == {"t2": "t2-easy1"}


@pytest.mark.parametrize("name,args", [("uniform", {}), ("uniform", {"pool_size": 4}), ("pools", {"pool_size": 5, "rescue_after": 1}),
                                       ("no_positive_resampling", {"pool_size": 5}),
                                       ("pcl", {"pool_size": 7}), ("dump", {"pool_size": 9})])
def test_state_round_trip_continues_exactly(name, args):
    env = DigitsEnv(9)
    rates = {}

    def run(s, steps, start=1):
        out = []
        for step in range(start, start + steps):
            batch = s.next(3)
            for t in batch:
                rates.setdefault(t.id, (len(t.id) * 7 + step) % 5)
            feed(s, batch, rates, step)
            out.append([t.id for t in batch])
        return out

    a = SAMPLERS.get(name)(env, 1, **args)
    run(a, 4)
    state = copy.deepcopy(a.state_dict())
    expected = run(a, 5, start=5)
    b = SAMPLERS.get(name)(env, 1, **args)
    b.load_state_dict(state)
    assert run(b, 5, start=5) == expected
    assert b.history.rows() == a.history.rows()


def test_arithmetic_offers_easier_variants_in_the_training_split():
    env = make_env("arithmetic", {"digits": 3})
    task = next(env.tasks("train", 0))
    easier = env.easier(task)
    assert easier.difficulty == 2 and env.score(easier, easier.answer).correct
    a, b = easier.question[:-1].split("+")
    assert len(a) <= 2 and len(b) <= 2
    assert env.easier(next(make_env("arithmetic", {"digits": 1}).tasks("train", 0))) is None


def test_a_mixture_draws_by_weight_and_scores_each_task_with_its_source():
    env = make_env("mixture", {"sources": [{"name": "arithmetic", "args": {"digits": 1}, "weight": 3, "label": "easy"},
                                           {"name": "sorting", "args": {}, "weight": 1}]})
    tasks = [t for t, _ in zip(env.tasks("train", 0), range(400))]
    share = sum(t.meta["source"] == "easy" for t in tasks) / len(tasks)
    assert 0.68 < share < 0.82
    assert {t.meta["source"] for t in tasks} == {"easy", "sorting"}
    for t in tasks[:20]:
        assert t.id.startswith(t.meta["source"] + "/")
        assert env.score(t, t.solution).correct and not env.score(t, "nonsense").correct
    assert [t.id for t, _ in zip(env.tasks("train", 0), range(50))] == [t.id for t in tasks[:50]]


BASE = 'recipe = "rl"\nname = "m"\n'


def load_recipe_text(text):
    return validate(tomllib.loads(text), "test.toml")


def test_env_sources_become_the_mixture_and_conflicts_are_errors():
    cfg = load_recipe_text(BASE + '[[env.sources]]\nname = "arithmetic"\nweight = 2\n[[env.sources]]\n'
                           'name = "arithmetic"\nargs = {digits = 5}\nlabel = "hard"\n')
    assert cfg.env.name == "mixture" and [s["label"] for s in cfg.env.args["sources"]] == [None, "hard"]
    with pytest.raises(UserError, match="either env.name"):
        load_recipe_text(BASE + '[env]\nname = "sorting"\n[[env.sources]]\nname = "arithmetic"\n')
    with pytest.raises(UserError, match="weight"):
        load_recipe_text(BASE + '[[env.sources]]\nname = "arithmetic"\nweight = 0\n')


def test_eval_suites_are_validated():
    cfg = load_recipe_text(BASE + '[[eval.suites]]\nlabel = "ood4"\nname = "arithmetic"\nargs = {digits = 4}\n')
    assert cfg.eval.suites[0].label == "ood4" and cfg.eval.suites[0].problems is None
    with pytest.raises(UserError, match="labels must differ"):
        load_recipe_text(BASE + '[[eval.suites]]\nlabel = "a"\nname = "arithmetic"\n'
                         '[[eval.suites]]\nlabel = "a"\nname = "sorting"\n')
    with pytest.raises(UserError, match="tasks"):
        load_recipe_text(BASE + '[[eval.suites]]\nlabel = "a"\nname = "arithmetic"\ntasks = 3\n')


def test_an_rl_run_on_a_mixture_with_a_bandit_over_sources_and_transfer_suites(tmp_path, tiny_dir):
    import json

    from posttrain.report import load_run, write_report
    from posttrain.report.data import eval_metric_names, eval_points
    from posttrain.runner import run

    cfg = validate({
        "recipe": "rl", "name": "mix", "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": "tiny-test"},
        "env": {"sources": [{"name": "arithmetic", "args": {"digits": 1}, "label": "d1", "weight": 2},
                            {"name": "arithmetic", "args": {"digits": 2}, "label": "d2"}]},
        "rl": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "micro_batch_size": 8,
               "sampler": "dump", "sampler_args": {"arms": "source"}},
        "eval": {"problems": 4, "samples": 2, "ks": [1, 2], "max_new_tokens": 4, "at_start": False,
                 "suites": [{"label": "ood3", "name": "arithmetic", "args": {"digits": 3}, "problems": 3}]},
    }, "test")
    run(cfg)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/samples" in r]
    assert len(steps) == 2
    for r in steps:
        by_source = sum(r.get(f"rollout/samples/{s}", 0) for s in ("d1", "d2"))
        assert by_source == r["rollout/samples"] == 16
        assert sum(v for k, v in r.items() if k.startswith("curriculum/arm_prob/")) == pytest.approx(1.0)
    assert steps[0]["curriculum/arm_prob/d1"] == steps[0]["curriculum/arm_prob/d2"] == 0.5  # both unexplored
    final = json.loads((cfg.run_dir / "eval" / "rl.json").read_text())
    assert final["suites"]["ood3"]["problems"] == 3 and final["suites"]["ood3"]["env"] == "arithmetic"
    assert set(final["by_source"]) <= {"d1", "d2"} and sum(v["problems"] for v in final["by_source"].values()) == 4
    logged = [r for r in rows if "eval/ood3/greedy_acc" in r]
    assert logged and logged[-1]["eval/ood3/pass@1"] == final["suites"]["ood3"]["pass@1"]["mean"]
    assert all(json.loads(x)["id"].split("/")[0] in ("d1", "d2")
               for x in (cfg.run_dir / "prompts.jsonl").read_text().splitlines())
    html = write_report([cfg.run_dir]).read_text()
    assert "<th>ood3/pass@1</th>" in html and "<th>ood3/greedy_acc</th>" in html
    run_data = load_run(cfg.run_dir)
    assert "ood3/pass@1" in eval_metric_names([run_data])  # a panel of the eval-over-steps figure, with its CIs
    assert all(p[2] is not None for p in eval_points(run_data, "ood3/pass@1"))


@pytest.mark.parametrize("name", ["uniform", "pools"])
def test_a_pool_larger_than_the_environment_holds_is_what_it_holds(name):
    """1-digit additions have under 100 distinct training tasks: pool_size = 5000 must end, not loop forever."""
    s = SAMPLERS.get(name)(make_env("arithmetic", {"digits": 1}), 0, pool_size=5000)
    ids = [t.id for t in s.next(300)]
    assert len(set(ids)) < 100 and len(ids) == (300 if name == "uniform" else len(set(ids)))
