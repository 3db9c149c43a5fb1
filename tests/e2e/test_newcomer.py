"""What a new user tripped over (issue: failed starts, misleading commands, the report), each through the real
`posttrain` command in a subprocess where it is a CLI matter."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_recipes import tiny_sft_rl, write_recipe

ROOT = Path(__file__).resolve().parents[2]

def write_tiny(folder: Path) -> Path:
    """The tiny SFT -> RL recipe (an RL evaluation every step) writing its runs under folder/runs."""
    return write_recipe(folder / "tiny.toml", tiny_sft_rl(output_dir=str(folder / "runs"), rl={"eval_every": 1}))


def posttrain(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, cwd=cwd, timeout=600, env={**os.environ, **(env or {})})


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture()
def recipe(tmp_path):
    return write_tiny(tmp_path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny SFT -> RL run, shared by the read-only checks."""
    root = tmp_path_factory.mktemp("finished")
    path = write_tiny(root)
    proc = posttrain("run", path)
    assert proc.returncode == 0, proc.stderr
    return path, root / "runs" / "tiny", proc


# 1. a failed start never blocks the corrected command ------------------------------------------------------------

@pytest.mark.slow
def test_a_failed_start_leaves_nothing_that_refuses_the_fix(recipe, tmp_path):
    bad = posttrain("run", recipe, "--set", "env.args={digit = 1}")
    assert "env.args" in one_line_error(bad) and "digit" in bad.stderr
    assert not (tmp_path / "runs" / "tiny").exists()  # checked before the run directory is touched
    bad = posttrain("run", recipe, "--set", "model.path=/no/such/model")
    assert "model.path" in one_line_error(bad) and not (tmp_path / "runs" / "tiny").exists()
    # a directory left by a start that failed later (no checkpoint yet) belongs to the next command
    stale = tmp_path / "runs" / "tiny"
    stale.mkdir(parents=True)
    (stale / ".posttrain-run").write_text("")
    (stale / "config.json").write_text(json.dumps({"config": {"recipe": ["sft"], "seed": 9}, "meta": {}}))
    ok = posttrain("run", recipe, "--set", "rl.steps=1", "--set", "sft.steps=1")
    assert ok.returncode == 0, ok.stderr
    assert "never reached a checkpoint" in (stale / "run.log").read_text()


# 2. one line, exit 2, instead of tracebacks ---------------------------------------------------------------------

@pytest.mark.slow
def test_commands_that_used_to_trace_back(finished, tmp_path):
    _, run_dir, _ = finished
    assert "has the sweep run yet" in one_line_error(posttrain("iso-compute", tmp_path / "group-size"))
    assert "--split 'test'" in one_line_error(posttrain("eval", run_dir, "--split", "test"))
    assert "--problems 0" in one_line_error(posttrain("eval", run_dir, "--problems", "0"))
    unfinished = tmp_path / "half"
    (unfinished / "checkpoints" / "step_3").mkdir(parents=True)
    (unfinished / ".posttrain-run").write_text("")
    (unfinished / "config.json").write_text(json.dumps({"config": {}, "meta": {}}))
    line = one_line_error(posttrain("eval", unfinished))
    assert "has not finished" in line and "step_3" in line


# 3 + 9. eval: a run directory works, with the run's own protocol, and never overwrites --------------------------

@pytest.mark.slow
def test_eval_of_a_run_uses_its_protocol_and_keeps_every_result(finished):
    _, run_dir, _ = finished
    first = posttrain("eval", run_dir, "--n", "4", "--k", "1,4")
    second = posttrain("eval", run_dir, "--n", "4", "--k", "1,4")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    files = sorted((run_dir / "eval" / "adhoc").glob("*.json"))
    assert [f.name for f in files] == ["arithmetic-final-eval-n4-2.json", "arithmetic-final-eval-n4.json"]
    result = json.loads(files[1].read_text())
    # from the run's recipe: 3 problems, 3 new tokens; from the command line: n = 4
    assert result["problems"] == 3 and result["max_new_tokens"] == 3 and result["samples"] == 4
    assert result["adhoc"] and result["protocol"]["env_args"] == {"digits": 1}
    assert "eval 15/15 completions" in first.stdout  # a progress line, also when the output is a log file


# 3. fit: the quickstart's default works, says what to use instead, warns when the fit is not identified ---------

@pytest.mark.slow
def test_fit_reads_a_finished_sft_rl_run_on_its_default_axis(finished):
    from posttrain.commands.fit import read_xy

    _, run_dir, _ = finished
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sft, step0 = [r for r in rows if r.get("eval/pass@1") is not None and r["step"] == 2]
    assert sft["compute/flops"] == step0["compute/flops"]  # the sft and rl-step0 evals: the same model, same x
    xs, _ = read_xy(run_dir, "compute/flops", "eval/pass@1")  # used to fail: "does not increase"
    with_both = [r for r in rows if r.get("eval/pass@1") is not None and r.get("compute/flops") is not None]
    assert list(xs) == sorted(set(xs)) and len(xs) == len(with_both) - 1  # the repeated point counted once


def write_metrics(run, pairs, stage="rl"):
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "stage": stage, "compute/flops": float(a),
                                                           "eval/pass@1": float(b)}) + "\n"
                                               for i, (a, b) in enumerate(pairs)))


def test_fit_names_the_stage_column_when_x_repeats_and_writes_one_png_per_form(tmp_path):
    from posttrain.commands.fit import run_fit
    from posttrain.errors import UserError

    write_metrics(tmp_path / "rep", [(1, 0.1), (2, 0.2), (2, 0.3)])
    with pytest.raises(UserError, match="does not increase.*--x compute/rl_flops"):
        run_fit([tmp_path / "rep"], x="compute/flops", y="eval/pass@1", form="sigmoid", fit_until=None,
                exclude_frac=0.0, out=None, as_json=True, n_boot=10)
    run = tmp_path / "ok"
    write_metrics(run, [(x, 0.6 - 0.5 / (1 + x / 4)) for x in range(1, 12)])
    for form in ("sigmoid", "power"):
        run_fit([run], x="compute/flops", y="eval/pass@1", form=form, fit_until=None, exclude_frac=0.0, out=None,
                as_json=True, n_boot=10)
    assert sorted(p.name for p in run.glob("fit_*.png")) == ["fit_eval_pass@1_vs_compute_flops_power.png",
                                                             "fit_eval_pass@1_vs_compute_flops_sigmoid.png"]


def test_an_unidentified_fit_says_so(tmp_path, capsys):
    import numpy as np

    from posttrain.commands.fit import run_fit

    run = tmp_path / "r"
    run.mkdir()
    x = np.array([1, 2, 3, 4, 5], dtype=float) * 1e12
    y = 0.1 + 0.05 * np.arange(1, 6)  # still rising in a straight line: no asymptote in sight
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "compute/rl_flops": float(a),
                                                           "eval/pass@1": float(b)}) + "\n"
                                               for i, (a, b) in enumerate(zip(x, y))))
    result = run_fit([run], x="compute/rl_flops", y="eval/pass@1", form="power", fit_until=None, exclude_frac=0.0,
                     out=None, as_json=False, n_boot=50)
    out = capsys.readouterr().out
    assert result["fit"]["at_bounds"] and "not identified" in out


# 6. rich markup never eats user text ----------------------------------------------------------------------------

@pytest.mark.slow
def test_square_brackets_survive(finished):
    _, run_dir, _ = finished
    line = one_line_error(posttrain("eval", run_dir, "--env-arg", "digits=abc"))
    assert "int or [min, max]" in line
    assert "(int or [min, max])" in posttrain("envs").stdout
    assert "plus [axes]" in posttrain("sweep", "--help").stdout
    bad = Path(str(run_dir.parent / "[red]x.toml"))
    assert "[red]x.toml" in one_line_error(posttrain("run", bad))


# 7. a preset overridden by the recipe says so --------------------------------------------------------------------

def test_a_preset_with_recipe_overrides_records_them(tmp_path):
    from posttrain.config import load_recipe

    cfg = load_recipe(ROOT / "recipes" / "quickstart.toml", ["rl.preset=dapo"])
    assert cfg.rl.preset_overrides == ["group_filter: 'dynamic_sampling' -> 'zero_variance'"]
    assert "preset_overrides" in cfg.model_dump()["rl"]  # recorded in config.json / config.toml
    assert load_recipe(ROOT / "recipes" / "quickstart.toml", ["rl.preset=grpo"]).rl.preset_overrides != []


# 8. progress and noise ------------------------------------------------------------------------------------------

def test_a_stage_that_stops_early_leaves_its_bar_at_the_step_it_reached(tmp_path):
    import io

    from rich.console import Console

    from posttrain.runtime.services import Services
    from posttrain.runtime.state import RunState

    buf = io.StringIO()
    say = Services(tmp_path, Console(file=buf, force_terminal=True, width=120), RunState())
    for step in say.progress(range(10), total=10, description="sft"):
        say.status("loss 0.1")
        if step == 3:
            break
    text = buf.getvalue()
    assert "stopped at 4/10" in text
    say.heartbeat.close()


def test_no_library_noise_in_a_run(finished):
    _, _, proc = finished
    assert "deprecated" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert "rl 2/2" in proc.stderr  # a log (not a terminal) still gets progress lines


# 9. provenance and files ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_provenance_is_kept_and_tensorboard_matches_metrics_after_a_resume(recipe, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    proc = posttrain("run", recipe, env={"POSTTRAIN_FAULT": "train:3"})  # killed in RL step 2
    assert proc.returncode == -9
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["meta"]["code"] and "dirty" in saved["meta"] and len(saved["starts"]) == 1
    assert posttrain("run", recipe).returncode == 0  # resumes from step_2
    again = json.loads((run_dir / "config.json").read_text())
    assert again["meta"] == saved["meta"] and len(again["starts"]) == 2  # creation kept, the resume appended
    before = (run_dir / "config.json").read_bytes()
    assert "already finished" in posttrain("run", recipe).stderr
    assert (run_dir / "config.json").read_bytes() == before  # printing a summary rewrites nothing

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for tag in ("pg/loss", "sft/loss", "rollout/reward_mean"):
        tb_steps = [e.step for e in events.Scalars(tag)]
        assert tb_steps == [r["step"] for r in rows if tag in r], tag  # no step twice after the resume
    assert "train/loss" not in events.Tags()["scalars"]  # the SFT loss and the RL surrogate are apart


@pytest.mark.slow
def test_iso_compute_and_plan_say_what_they_write(finished, tmp_path):
    _, run_dir, _ = finished
    proc = posttrain("iso-compute", run_dir, "--x", "compute/rl_flops")
    assert proc.returncode == 0, proc.stderr
    assert f"written: {run_dir / 'iso_compute.csv'}" in proc.stdout and (run_dir / "iso_compute.png").is_file()
    assert not (run_dir.parent / "iso_compute.csv").exists()
    typo = one_line_error(posttrain("iso-compute", run_dir, "--x", "compute/rl_flop"))
    assert "columns:" in typo and "compute/rl_flops" in typo
    plan = posttrain("sweep", ROOT / "recipes" / "scaling" / "group-size.toml", "--plan")
    assert "would be written" in plan.stdout


# 10. small CLI gaps ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_small_cli_gaps(finished):
    path, _, _ = finished
    assert posttrain("--version").stdout.startswith("posttrain ")
    assert "Usage" in posttrain("run", "-h").stdout
    assert "<bool>" not in posttrain("run", "--help").stdout
    t0 = time.time()
    proc = posttrain("run", path)
    quick = time.time() - t0
    assert "already finished" in proc.stderr
    # the finished-run summary: mean@n (= pass@1) is not repeated, and rl-step0 (the sft model again) is merged
    assert "mean@n" not in proc.stdout and "sft = rl-step0" in proc.stdout
    probe = subprocess.run([sys.executable, "-c", (
        f"import sys; sys.argv = ['posttrain', 'run', {str(path)!r}]\n"
        "from posttrain import cli\n"
        "try:\n    cli.app()\nexcept SystemExit:\n    pass\n"
        "print('transformers' in sys.modules)")], capture_output=True, text=True, cwd=ROOT, check=False)
    assert probe.stdout.strip().endswith("False"), probe.stdout + probe.stderr  # no model code imported
    assert quick < 30


def test_set_null_unsets_an_optional_key(tmp_path):
    from posttrain.config import load_recipe

    cfg = load_recipe(ROOT / "recipes" / "quickstart.toml", ["sft.stop_at_accuracy=null", 'name="null"'])
    assert cfg.sft.stop_at_accuracy is None and cfg.name == "null"
