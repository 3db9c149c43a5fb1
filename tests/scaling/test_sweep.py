"""Sweeps: planning and validation, a tiny sweep end to end with resume, seed aggregation, iso-compute."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from posttrain.errors import UserError
from posttrain.scaling.sweep import load_sweep, run_sweep
from posttrain.scaling.sweep_results import aggregate, iso_compute

ROOT = Path(__file__).resolve().parents[2]

BASE = """
recipe = "sft"
name = "base"
threads = 1
[model]
path = "tiny-test"
bf16 = false
[env]
name = "arithmetic"
args = { digits = 1 }
[sft]
steps = 2
batch_size = 8
micro_batch_size = 8
[eval]
problems = 4
samples = 2
ks = [1, 2]
max_new_tokens = 4
at_start = false
"""


def write_sweep(tmp_path: Path, body: str) -> Path:
    (tmp_path / "recipes").mkdir(exist_ok=True)
    (tmp_path / "recipes" / "base.toml").write_text(BASE)
    path = tmp_path / "sweeps" / "s.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f'base = "../recipes/base.toml"\nname = "tiny"\noutput_dir = "{tmp_path / "out"}"\n' + body)
    return path


# -- planning ---------------------------------------------------------------------------------------------------
def test_plan_is_the_cartesian_product_with_readable_names(tmp_path):
    path = write_sweep(tmp_path, '[axes]\n"sft.lr" = [0.001, 0.0003]\nseed = [0, 1, 2]\n'
                                 '[axes.eval]\nsamples = [2]\n[set]\n"sft.steps" = 3\nenv.args = {digits = 2}\n')
    sweep = load_sweep(path)
    assert list(sweep.axes) == ["sft.lr", "seed", "eval.samples"]
    assert [p.name for p in sweep.points[:4]] == [
        "tiny-lr=0.001-seed=0-samples=2", "tiny-lr=0.001-seed=1-samples=2", "tiny-lr=0.001-seed=2-samples=2",
        "tiny-lr=0.0003-seed=0-samples=2"]
    assert len(sweep.points) == 6
    p = sweep.points[3]
    assert (p.cfg.sft.lr, p.cfg.seed, p.cfg.sft.steps, p.cfg.env.args) == (0.0003, 0, 3, {"digits": 2})
    assert p.cfg.model.path == "tiny-test" and p.cfg.run_dir == tmp_path / "out" / p.name
    assert sweep.results_csv == tmp_path / "out" / "results.csv"


def test_axis_labels_keep_the_section_when_two_axes_share_a_name(tmp_path):
    base = BASE.replace('recipe = "sft"', 'recipe = ["sft", "rl"]')
    path = write_sweep(tmp_path, '[axes]\n"sft.lr" = [0.001]\n"rl.lr" = [0.0001, 0.0002]\n')
    (tmp_path / "recipes" / "base.toml").write_text(base)
    assert [p.name for p in load_sweep(path).points] == ["tiny-sft.lr=0.001-rl.lr=0.0001",
                                                         "tiny-sft.lr=0.001-rl.lr=0.0002"]


@pytest.mark.parametrize("body, message", [
    ('[axes]\n"rl.grup_size" = [4, 8]\n', "'rl.grup_size' is not a recipe key"),
    ("[axes]\nseeds = [0, 1]\n", "'seeds' is not a recipe key"),
    ("[axes.rl]\ngroupsize = [4]\n", "'rl.groupsize' is not a recipe key"),
    ('[axes]\n"seed.x" = [1]\n', "seed is not a section"),
    ('[axes]\n"sft.steps" = 3\n', "axis 'sft.steps' must be a non-empty list"),
    ('[axes]\n"sft.steps" = [2, 2]\n', "axis 'sft.steps' repeats a value"),
    ('[axes]\nname = ["a", "b"]\n', "'name' is set by the sweep"),
    ('[axes]\n"sft.lr" = [-1.0, 0.001]\n', "point tiny-lr=-1.0): sft.lr: Input should be greater than 0"),
    ('[axes]\nseed = [0]\n[set]\n"sft.stepz" = 3\n', "[set]: 'sft.stepz' is not a recipe key"),
    ('[axes]\nseed = [0]\n[set]\nseed = 1\n', "'seed' is both an axis and in [set]"),
    ('[axes]\nseed = [0]\n[axis]\nx = 1\n', "unknown top-level key 'axis'"),
    ("[axes]\n", "[axes] is empty"),
    ('[axes]\nsft = [1]\n', "'sft' is a whole section"),
])
def test_validation_errors_name_the_offending_key(tmp_path, body, message):
    path = write_sweep(tmp_path, body)
    with pytest.raises(UserError) as err:
        load_sweep(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_shipped_ladder_plans_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output_dir is relative to the working directory
    csv_path = run_sweep(ROOT / "recipes" / "scaling" / "ladder.toml", only_plan=True)
    sweep = load_sweep(ROOT / "recipes" / "scaling" / "ladder.toml")
    assert len(sweep.points) == 9 and sweep.points[0].name == "ladder-seed=0-group_size=4"
    assert all(p.cfg.recipe == ["sft", "rl"] and p.cfg.rl.eval_every > 0 for p in sweep.points)
    assert csv_path == Path("runs/ladder/results.csv") and not Path("runs").exists()


# -- end to end -------------------------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_sweep_end_to_end_and_resume(tmp_path):
    path = write_sweep(tmp_path, '[axes]\n"sft.lr" = [0.001, 0.002]\n')
    csv_path = run_sweep(path)
    rows = read_csv(csv_path)
    assert [r["point"] for r in rows] == ["tiny-lr=0.001", "tiny-lr=0.002"]
    assert [r["sft.lr"] for r in rows] == ["0.001", "0.002"]
    for r in rows:
        assert 0 <= float(r["eval/pass@1"]) <= 1 and float(r["compute/flops"]) > 0
        assert r["steps"] == "2" and float(r["time/elapsed_s"]) > 0
    first, second = (tmp_path / "out" / r["point"] for r in rows)
    before = (first / "metrics.jsonl").read_text(), (first / "metrics.jsonl").stat().st_mtime_ns
    text = csv_path.read_text()

    # "interrupt" the second point: it lost its DONE marker and summary (and its row)
    (second / "DONE").unlink()
    (second / "summary.json").unlink()
    assert len(read_csv(run_sweep(path, only_plan=True))) == 2  # planning writes nothing
    csv_path.write_text(text.splitlines()[0] + "\n" + text.splitlines()[1] + "\n")
    assert run_sweep(path) == csv_path
    assert ((first / "metrics.jsonl").read_text(), (first / "metrics.jsonl").stat().st_mtime_ns) == before
    assert (second / "DONE").exists()
    assert csv_path.read_text() == text  # both rows again, same values: idempotent

    # a finished point whose saved config no longer matches the sweep is an error, before anything runs
    path.write_text(path.read_text() + '[set]\n"sft.steps" = 3\n')
    with pytest.raises(UserError, match="sft.steps differ"):
        run_sweep(path)


# -- seeds -------------------------------------------------------------------------------------------------------
T95 = {1: 12.706204736174703, 2: 4.302652729749464}  # Student t quantile 0.975 for 1 and 2 degrees of freedom


def test_aggregate_means_and_t_intervals(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text("point,rl.group_size,seed,eval/pass@1,compute/flops,steps\n"
                        "a0,4,0,0.2,100,10\na1,4,1,0.4,110,10\na2,4,2,0.6,120,10\n"
                        "b0,8,0,0.5,200,10\nb1,8,1,0.7,,10\n")
    out = aggregate(csv_path, over="seed")
    a, b = out
    assert (a["rl.group_size"], a["n"], a["seed_values"]) == (4, 3, "0 1 2")
    assert a["eval/pass@1_mean"] == pytest.approx(0.4)
    assert a["eval/pass@1_std"] == pytest.approx(0.2)
    half = T95[2] * 0.2 / math.sqrt(3)
    assert (a["eval/pass@1_ci_lo"], a["eval/pass@1_ci_hi"]) == pytest.approx((0.4 - half, 0.4 + half))
    assert a["compute/flops_mean"] == pytest.approx(110) and a["steps_mean"] == 10
    half = T95[1] * math.sqrt(0.02) / math.sqrt(2)
    assert (b["eval/pass@1_ci_lo"], b["eval/pass@1_ci_hi"]) == pytest.approx((0.6 - half, 0.6 + half))
    assert b["compute/flops_mean"] == 200 and "compute/flops_ci_lo" not in b  # one value: no interval
    written = read_csv(tmp_path / "results_by_point.csv")
    assert [r["rl.group_size"] for r in written] == ["4", "8"]
    with pytest.raises(UserError, match="cannot aggregate over 'lr'; axis columns: rl.group_size, seed"):
        aggregate(csv_path, over="lr")


# -- iso-compute -------------------------------------------------------------------------------------------------
def fake_run(d: Path, curve: list[tuple[float, float]]) -> Path:
    d.mkdir(parents=True)
    rows = []
    for i, (x, y) in enumerate(curve):
        rows.append({"step": 2 * i, "compute/flops": x - 0.5, "train/loss": 1.0})  # a training row: no y
        rows.append({"step": 2 * i + 1, "compute/flops": x, "eval/pass@1": y})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_iso_compute_picks_the_best_run_at_each_budget(tmp_path):
    a = fake_run(tmp_path / "runs" / "a", [(1, 0.1), (2, 0.5), (4, 0.6)])
    b = fake_run(tmp_path / "runs" / "b", [(1, 0.2), (2, 0.3), (4, 0.9), (8, 0.95)])
    table = iso_compute([a, b])  # default budgets: geomspace(1, 4, 5), 4 = the smaller final compute
    assert [r["budget"] for r in table] == pytest.approx([1, 2 ** 0.5, 2, 2 ** 1.5, 4])
    assert [r["best"] for r in table] == ["b", "a", "a", "b", "b"]
    assert table[1]["a"] == pytest.approx(0.1 + (2 ** 0.5 - 1) * 0.4)
    assert table[3]["b"] == pytest.approx(0.3 + (2 ** 1.5 - 2) / 2 * 0.6)
    beyond = iso_compute(tmp_path / "runs", budgets=[3, 8])  # a directory of runs works too
    assert math.isnan(beyond[1]["a"]) and beyond[1]["best"] == "b"  # a never reached 8: not extrapolated
    assert beyond[0]["best"] == "b" and beyond[0]["a"] == pytest.approx(0.55)
    assert (tmp_path / "runs" / "iso_compute.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["best"] for r in read_csv(tmp_path / "runs" / "iso_compute.csv")] == ["b", "b"]
    assert iso_compute([a, b], budgets=[2], maximize=False)[0]["best"] == "b"
    c = fake_run(tmp_path / "other" / "c", [(1, 0.2), (4, 0.2)])
    assert iso_compute([a, b, c], budgets=[1])[0]["best"] == "b | c"  # an exact tie names both


def test_iso_compute_over_seeds_in_a_sweep_directory(tmp_path):
    sweep = tmp_path / "ladder"
    curves = {("4", 0): [(1, 0.2), (3, 0.6)], ("4", 1): [(1, 0.4), (3, 0.6)],
              ("8", 0): [(1, 0.1), (3, 0.9)], ("8", 1): [(1, 0.1), (3, 0.5)]}
    lines = ["point,rl.group_size,seed,eval/pass@1"]
    for (g, s), curve in curves.items():
        fake_run(sweep / f"ladder-group_size={g}-seed={s}", curve)
        lines.append(f"ladder-group_size={g}-seed={s},{g},{s},{curve[-1][1]}")
    (sweep / "results.csv").write_text("\n".join(lines) + "\n")
    table = iso_compute(sweep, over="seed", budgets=[1, 2, 3])
    assert [r["best"] for r in table] == ["group_size=4", "group_size=4", "group_size=8"]
    assert table[1]["group_size=4"] == pytest.approx(0.45) and table[1]["group_size=8"] == pytest.approx(0.4)
    assert table[2]["group_size=8"] == pytest.approx(0.7)  # the mean over its two seeds
    per_point = iso_compute(sweep, budgets=[3])
    assert per_point[0]["best"] == "ladder-group_size=8-seed=0"
    with pytest.raises(UserError, match="no axis 'lr'"):
        iso_compute(sweep, over="lr")


def test_runs_of_different_precisions_or_cpus_are_not_compared_unless_asked(tmp_path):
    a = fake_run(tmp_path / "runs" / "a", [(1, 0.1), (4, 0.6)])
    b = fake_run(tmp_path / "runs" / "b", [(1, 0.2), (4, 0.9)])
    for d, precision in ((a, "fp32"), (b, "bf16")):
        (d / "summary.json").write_text(json.dumps({"precision": precision, "cpu": "AMD EPYC",
                                                    "cpu_features": ["avx2"]}))
    with pytest.raises(UserError, match="mixes runs of different precisions.*--mixed-machines"):
        iso_compute([a, b], budgets=[2])
    assert iso_compute([a, b], budgets=[2], allow_mixed=True)[0]["best"] == "b"
    (a / "summary.json").write_text(json.dumps({"precision": "bf16", "cpu": "AMD EPYC", "cpu_features": ["avx2"]}))
    assert iso_compute([a, b], budgets=[2])[0]["best"] == "b"  # one machine kind: compared
    csv_path = tmp_path / "results.csv"
    csv_path.write_text("point,seed,eval/pass@1,precision,cpu\np0,0,0.5,fp32,AMD EPYC\np1,1,0.6,bf16,AMD EPYC\n")
    with pytest.raises(UserError, match="mixes runs"):
        aggregate(csv_path, over="seed")
    rows = aggregate(csv_path, over="seed", allow_mixed=True)
    assert rows[0]["n"] == 2 and "precision" not in rows[0]  # metadata, not an axis
