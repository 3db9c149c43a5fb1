"""Hostile command lines: every impossible flag value or output path is one line naming the flag or file with exit
status 2, before any work and without touching an input; outputs are written whole or not at all, and SIGTERM
stops a command (a sweep, a run in its start-of-run evaluation, distill-data) with exit status 143 and nothing
half-written."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_hostile_inputs import ROOT, one_line, posttrain  # tests/ is on sys.path under pytest

ROWS = [{"prompt": f"{i}+1=", "completion": str(i + 1), "answer": str(i + 1)} for i in range(6)]
SFT = ('threads = 1\n[model]\npath = "tiny-test"\n[env]\nname = "arithmetic"\nargs = {digits = 1}\n'
       '[eval]\nproblems = 2\nsamples = 1\nks = [1]\nmax_new_tokens = 2\nat_start = false\n')


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def select(data, *args):
    return posttrain("data", "select", data, "--model", "tiny-test", "--filter", "none", *args)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def wait_for(condition, proc, what: str) -> None:
    """Poll until `condition()`; the deadline is only a safety net against a hung test, not a timing bound."""
    deadline = time.time() + 300
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}: {proc.communicate()[1]}"
        assert time.time() < deadline, f"no {what} after 300 s"
        time.sleep(0.1)


# ---- --out: never an input, never an existing file without --overwrite, never a directory or under a file -----

@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "overwrite"])
def test_select_refuses_to_write_over_its_input(data, spelling):
    before = data.read_bytes()
    out = {"same": data, "dotdot": data.parent / "x" / ".." / data.name, "overwrite": data,
           "symlink": data.parent / "link.jsonl"}[spelling]
    if spelling == "symlink":
        out.symlink_to(data)
    (data.parent / "x").mkdir()
    line = one_line(select(data, "-n", 2, "--out", out, *(["--overwrite"] if spelling == "overwrite" else [])))
    assert "--out" in line and "input" in line and data.name in line
    assert data.read_bytes() == before


def test_an_existing_output_needs_overwrite_and_is_then_replaced_whole(data, tmp_path):
    out = tmp_path / "subset.jsonl"
    out.write_text("precious\n")
    line = one_line(select(data, "-n", 2, "--out", out))
    assert "--out" in line and "subset.jsonl" in line and "--overwrite" in line
    assert out.read_text() == "precious\n"
    proc = select(data, "-n", 2, "--out", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text().splitlines()) == 2 and leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["distill-data", "eval"])
def test_distill_data_and_eval_refuse_an_existing_output(tmp_path, command):
    out = tmp_path / ("o.jsonl" if command == "distill-data" else "o.json")
    out.write_text("precious\n")
    line = one_line(posttrain(command, "tiny-test", "--env", "arithmetic", "--out", out))
    assert f"--out {out}" in line and "--overwrite" in line
    assert out.read_text() == "precious\n"


@pytest.mark.parametrize("command", ["distill-data", "eval", "report", "select"])
@pytest.mark.parametrize("where", ["under a file", "onto the wrong kind"])
def test_out_under_a_file_or_onto_the_wrong_kind_of_path(tmp_path, data, command, where):
    a_file = tmp_path / "a_file.jsonl"
    a_file.write_text("precious\n")
    a_dir = tmp_path / "a_dir.jsonl"
    a_dir.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")
    # report's --out is a directory (the wrong kind: a file); the others' is a file (the wrong kind: a directory)
    out = a_file / "x.jsonl" if where == "under a file" else a_file if command == "report" else a_dir
    args = {"distill-data": ["distill-data", "tiny-test", "--env", "arithmetic"],
            "eval": ["eval", "tiny-test", "--env", "arithmetic"], "report": ["report", run_dir],
            "select": ["data", "select", data, "-n", 2, "--model", "tiny-test"]}[command]
    line = one_line(posttrain(*args, "--out", out))
    assert f"--out {out}" in line
    assert ("a_file.jsonl is a file" if where == "under a file" else "is a ") in line
    assert a_file.read_text() == "precious\n" and not list(a_dir.iterdir())


# ---- impossible counts and temperatures ----------------------------------------------------------------------

@pytest.mark.parametrize(("args", "flag"), [
    (["select", "-n", 0], "-n 0"), (["select", "-n", -3], "-n -3"),
    (["select", "-n", 2, "--clusters", 0], "--clusters 0"), (["select", "-n", 2, "--generate", -1], "--generate -1"),
    (["diversity", "--dim", 0], "--dim 0"), (["diversity", "--layers", 0], "--layers 0"),
    (["diversity", "--layers", 999], "--layers 999"),
])
def test_data_commands_refuse_impossible_counts(data, tmp_path, args, flag):
    out = tmp_path / "subset.jsonl"
    before = data.read_bytes()
    extra = ["--out", out] if args[0] == "select" else []
    line = one_line(posttrain("data", args[0], data, "--model", "tiny-test", *extra, *args[1:]))
    assert line.startswith(f"error: {flag}:"), line
    assert not out.exists() and data.read_bytes() == before


@pytest.mark.parametrize("command", ["distill-data", "eval"])
@pytest.mark.parametrize("temperature", ["nan", "-1", "inf"])
def test_a_temperature_that_is_not_a_temperature_is_refused_not_recorded(tmp_path, command, temperature):
    out = tmp_path / ("o.jsonl" if command == "distill-data" else "o.json")
    line = one_line(posttrain(command, "tiny-test", "--env", "arithmetic", "--temperature", temperature,
                              "--out", out))
    assert f"--temperature {float(temperature)}" in line
    assert list(tmp_path.iterdir()) == []


def test_verifier_filter_with_the_code_environment(tmp_path):
    """Valid when each row's answer is the code environment's test cases ([call, value] pairs, as --generate
    writes them); a row whose answer is not is one line naming the row."""
    rows = [{"prompt": "Write f(x) returning (x+1)*3.", "completion": "def f(x):\n    return (x+1)*3",
             "answer": [["f(1)", 6], ["f(2)", 9]]},
            {"prompt": "Write f(x) returning x*2.", "completion": "def f(x):\n    return x+2",
             "answer": [["f(1)", 2], ["f(3)", 6]]}]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad.write_text("".join(json.dumps({**r, "answer": "6"}) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    code = ["--filter", "verifier", "--env", "code", "--env-arg", "sandbox=weak", "--model", "tiny-test"]
    proc = posttrain("data", "select", good, "-n", 2, "--out", out, *code)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["completion"] for x in out.read_text().splitlines()] == [rows[0]["completion"]]
    line = one_line(posttrain("data", "select", bad, "-n", 2, "--out", tmp_path / "o2.jsonl", *code))
    assert "row 1" in line and "'6'" in line


# ---- sweeps: damaged point directories, too many points ------------------------------------------------------

def sweep_file(tmp_path, axes: str) -> Path:
    (tmp_path / "base.toml").write_text('recipe = "sft"\n' + SFT + "[sft]\nsteps = 400\nbatch_size = 4\n"
                                        "micro_batch_size = 4\n[checkpoint]\nevery = 0\n")
    path = tmp_path / "sw.toml"
    path.write_text(f'base = "base.toml"\nname = "sw"\noutput_dir = "{tmp_path / "out"}"\n[axes]\n{axes}\n')
    return path


def test_a_sweep_of_a_hundred_million_points_is_refused_before_expanding(tmp_path):
    axes = "\n".join(f'"{k}" = {json.dumps(list(range(1, 101)))}'
                     for k in ("seed", "sft.steps", "sft.batch_size", "eval.problems"))
    line = one_line(posttrain("sweep", sweep_file(tmp_path, axes), "--plan"))
    assert "sw.toml" in line and "100,000,000 points" in line and "10,000" in line


@pytest.mark.parametrize("damaged", ["config.json", "summary.json"])
def test_a_sweep_point_with_a_damaged_file_is_one_line_naming_it(tmp_path, damaged):
    from posttrain.scaling.sweep import load_sweep

    path = sweep_file(tmp_path, "seed = [0, 1]")
    point = load_sweep(path).points[0]
    point.run_dir.mkdir(parents=True)
    config = {"config": point.cfg.model_dump(mode="json"), "meta": {}}
    (point.run_dir / "config.json").write_text("{not json" if damaged == "config.json" else json.dumps(config))
    if damaged == "summary.json":
        (point.run_dir / "DONE").write_text("")
        (point.run_dir / "summary.json").write_bytes(b"\x00\xff truncated")
    for args in (["--plan"], []):
        line = one_line(posttrain("sweep", path, *args))
        assert str(point.run_dir / damaged) in line
    assert not (tmp_path / "out" / "sw-seed=1").exists()  # nothing ran


# ---- SIGTERM -------------------------------------------------------------------------------------------------

def start(*args, cwd=ROOT):
    return subprocess.Popen([sys.executable, "-m", "posttrain.cli", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_stops_a_sweep_after_the_current_point_checkpoints(tmp_path):
    proc = start("sweep", sweep_file(tmp_path, "seed = [0, 1]"))
    first, second = tmp_path / "out" / "sw-seed=0", tmp_path / "out" / "sw-seed=1"
    metrics = first / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc, "training")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "stopped by SIGTERM" in (first / "run.log").read_text()
    ckpts = sorted((first / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").is_file()  # checkpointed although checkpoint.every = 0
    assert not (first / "DONE").exists() and not second.exists()  # no new point started


@pytest.mark.slow
def test_sigterm_during_the_start_of_run_evaluation_is_logged(tmp_path):
    recipe = tmp_path / "t.toml"
    recipe.write_text(f'recipe = "sft"\nname = "t"\noutput_dir = "{tmp_path}"\n'
                      # 3-digit sums: thousands of distinct eval problems (1-digit has 12, and an evaluation
                      # counts each distinct problem once, so it would end before the signal arrives)
                      + SFT.replace("digits = 1", "digits = 3").replace("problems = 2\nsamples = 1",
                                                                        "problems = 5000\nsamples = 8")
                      .replace("max_new_tokens = 2\nat_start = false", "max_new_tokens = 16\nat_start = true")
                      + "[sft]\nsteps = 2\nbatch_size = 4\nmicro_batch_size = 4\n")
    proc = start("run", recipe)
    heartbeat = tmp_path / "t" / "heartbeat.json"

    def evaluating() -> bool:
        try:
            return json.loads(heartbeat.read_text())["phase"] == "eval"
        except (OSError, ValueError):
            return False

    wait_for(evaluating, proc, "the start-of-run evaluation")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM before the first training step" in (tmp_path / "t" / "run.log").read_text()
    assert not (tmp_path / "t" / "eval" / "base.json").exists() and not (tmp_path / "t" / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_during_distill_data_leaves_no_partial_file(tmp_path):
    out = tmp_path / "teacher.jsonl"
    out.write_text("precious\n")
    proc = start("distill-data", "tiny-test", "--env", "arithmetic", "--out", out, "--prompts", 100_000,
                 "--keep-failed", "--overwrite")
    wait_for(lambda: (tmp_path / "teacher.jsonl.tmp").exists(), proc, "teacher.jsonl.tmp")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "teacher.jsonl" in err
    assert out.read_text() == "precious\n" and sorted(p.name for p in tmp_path.iterdir()) == ["teacher.jsonl"]
