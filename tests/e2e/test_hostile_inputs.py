"""Every hostile or malformed input is one line naming the file or key, exit status 2, and nothing is lost;
`--fresh` and run names can never delete what posttrain does not own; SIGTERM checkpoints and stops."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_recipes import tiny_recipe, write_recipe

from posttrain.config import load_recipe, validate
from posttrain.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny_recipe()


def posttrain(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, cwd=cwd, timeout=600)


def one_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# ---- run names and --fresh ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "..", "../victim", "a/b", ".", " lead"])
def test_a_run_name_is_one_directory_name(name):
    with pytest.raises(UserError, match="name: must be a single directory name"):
        validate({**TINY, "name": name})


@pytest.mark.parametrize("case", ["not a run dir", "a file", "src-like tree", "symlink to a run"])
def test_fresh_deletes_only_a_posttrain_run_directory(tmp_path, case):
    from posttrain.rundir import MARKER, remove_run_dir

    target = tmp_path / "target"
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    if case == "not a run dir":
        target.mkdir()
        (target / "notes.txt").write_text("precious")
    elif case == "a file":
        target.write_text("precious")
    elif case == "src-like tree":
        (target / "pkg").mkdir(parents=True)
        (target / "pkg" / "__init__.py").write_text("x = 1")
        (target / "config.json").write_text('{"name": "not ours"}')
    else:
        real = tmp_path / "real-run"
        real.mkdir()
        (real / MARKER).write_text("")
        target.symlink_to(real)
    with pytest.raises(UserError, match="not a posttrain run directory"):
        remove_run_dir(target)
    assert target.exists() or target.is_symlink()
    assert keep.read_text() == "mine"


def test_fresh_deletes_a_real_run_and_nothing_beside_it(tmp_path):
    from posttrain.rundir import MARKER, remove_run_dir

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / MARKER).write_text("")
    sibling = tmp_path / "runs" / "other.txt"
    sibling.write_text("keep")
    remove_run_dir(run)
    assert not run.exists() and sibling.read_text() == "keep"


@pytest.mark.slow
def test_fresh_through_the_cli_refuses_a_directory_it_does_not_own(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "code.py").write_text("print('precious')")
    recipe = tmp_path / "r.toml"
    recipe.write_text('recipe = "sft"\nname = "src"\n[model]\npath = "tiny-test"\n')
    line = one_line(posttrain("run", recipe, "--set", f"output_dir={project}", "--fresh"))
    assert "not a posttrain run directory" in line
    assert (project / "src" / "code.py").read_text() == "print('precious')"


# ---- malformed recipes, data and run directories -------------------------------------------------------------

@pytest.mark.parametrize(("setting", "key"), [
    ("sft.lr=inf", "sft.lr"), ("seed=-1", "seed"), ("env.score_timeout_s=inf", "env.score_timeout_s"),
    ("env.failure_reward=nan", "env.failure_reward"), ("recipe=[]", "recipe"),
])
def test_impossible_values_are_errors_naming_the_key(tmp_path, setting, key):
    path = tmp_path / "r.toml"
    path.write_text('recipe = ["sft", "rl"]\n')
    with pytest.raises(UserError) as e:
        load_recipe(path, [setting])
    assert f"{path}: {key}" in str(e.value)


def test_rl_nan_coefficients_and_group_size_one(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('recipe = "rl"\n')
    with pytest.raises(UserError, match="rl.entropy_coef"):
        load_recipe(path, ["rl.entropy_coef=nan"])
    with pytest.raises(UserError, match="rl.group_size: 1 with advantage 'grpo'"):
        load_recipe(path, ["rl.group_size=1"])


def test_recipe_files_that_are_not_toml(tmp_path):
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00 recipe")
    with pytest.raises(UserError, match="bin.toml: not valid TOML"):
        load_recipe(binary)
    with pytest.raises(UserError, match="is a directory"):
        load_recipe(tmp_path)


@pytest.mark.parametrize(("content", "message"), [
    (b'{"prompt": "a", "completion": "b"}\n\xff\xfe\n', "d.jsonl:2: not UTF-8"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "d.jsonl:1: JSON nested too deeply"),
    (b'{"prompt": "a", "completion": ' + b"9" * 5000 + b"}\n", "d.jsonl:1: unreadable JSON value"),
    (b'{"prompt": "' + b"x" * (2 << 20) + b'", "completion": "b"}\n', "d.jsonl:1: a line of"),
])
def test_sft_data_that_cannot_be_read(tmp_path, content, message):
    from posttrain.data.sft import read_pairs

    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_pairs(path)


def test_jsonl_tasks_that_are_not_utf8(tmp_path):
    from posttrain.envs.jsonl import read_tasks

    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff", "answer": "2"}\n')
    with pytest.raises(UserError, match="t.jsonl:2: not UTF-8"):
        read_tasks(path)


def test_an_sft_example_longer_than_the_context(tiny, tmp_path):
    from posttrain.data.sft import file_examples

    _, tok = tiny
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "completion": "2" * 600}) + "\n")
    with pytest.raises(UserError, match=r"long.jsonl:1: prompt \+ completion are \d+ tokens, more than the model's "
                                        r"context of 512"):
        next(file_examples(path, tok, seed=0, chat_template=True, max_len=512))


@pytest.mark.slow
def test_damaged_run_directories(tmp_path):
    cfg = validate({**TINY, "output_dir": str(tmp_path), "checkpoint": {"every": 1, "keep_last_n": 5}})
    from posttrain.runner import run

    run(cfg)
    recipe = write_recipe(tmp_path / "t.toml", tiny_recipe(output_dir=str(tmp_path),
                                                           checkpoint={"every": 1, "keep_last_n": 5}))
    run_dir = tmp_path / "t"
    # a truncated model file in the checkpoint a resume would load
    (run_dir / "DONE").unlink()
    weights = run_dir / "checkpoints" / "step_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    line = one_line(posttrain("run", recipe))
    assert "step_2" in line and "delete it to resume from the one before" in line
    # a truncated final model in `posttrain eval`
    final = run_dir / "final" / "model.safetensors"
    final.write_bytes(final.read_bytes()[:100])
    assert "final" in one_line(posttrain("eval", run_dir / "final", "--env", "arithmetic"))
    # a damaged config.json
    (run_dir / "config.json").write_text("{not json")
    assert "config.json" in one_line(posttrain("run", recipe))


# ---- SIGTERM ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_checkpoints_logs_and_the_rerun_finishes(tmp_path):
    recipe = tmp_path / "t.toml"
    recipe.write_text(f'recipe = "sft"\nname = "t"\noutput_dir = "{tmp_path}"\nthreads = 1\n[model]\n'
                      'path = "tiny-test"\n[env]\nname = "arithmetic"\nargs = {digits = 1}\n[sft]\nsteps = 400\n'
                      'batch_size = 4\nmicro_batch_size = 4\n[eval]\nproblems = 2\nsamples = 1\nks = [1]\n'
                      'max_new_tokens = 2\nat_start = false\n[checkpoint]\nevery = 0\n')
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "t"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training has started
        rows = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        if len(rows) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "re-run the same command to resume" in err
    assert "stopped by SIGTERM" in (run_dir / "run.log").read_text()
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").is_file()  # written although checkpoint.every = 0
    stopped_at = int(ckpts[-1].name.split("_")[1])
    again = posttrain("run", recipe)
    assert again.returncode == 0, again.stderr
    assert f"resuming {run_dir} from step_{stopped_at}" in again.stderr
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "sft/loss" in r]
    assert steps == list(range(1, 401))  # nothing lost, nothing twice
    assert os.path.isdir(run_dir / "final")


def test_a_modified_package_is_detected(tmp_path, monkeypatch):
    """Editable installs are checked with git; a wheel's files against their RECORD hashes."""
    from posttrain import integrity

    how, _ = integrity.modified_files()
    assert how in ("git", "the wheel's RECORD") or how.startswith("nothing")
    # a wheel-style RECORD with one file whose hash no longer matches
    target = tmp_path / "posttrain" / "envs" / "sandbox.py"
    target.parent.mkdir(parents=True)
    target.write_text("ORIGINAL = True\n")

    class Hash:
        mode, value = "sha256", "not-the-hash"

    class File:
        hash = Hash()

        def __str__(self):
            return "posttrain/envs/sandbox.py"

        def locate(self):
            return target

    class Dist:
        files = (File(),)

    monkeypatch.setattr(integrity, "distribution", lambda name: Dist())
    assert integrity.modified_files() == ("the wheel's RECORD", ["posttrain/envs/sandbox.py"])


@pytest.mark.slow
def test_the_code_environment_trains_an_untrained_model_without_stopping(tmp_path):
    # every completion of a random model is broken Python: 0 reward each, never a scoring error
    cfg = validate({"recipe": "rl", "name": "code", "output_dir": str(tmp_path), "threads": 1,
                    "model": {"path": "tiny-test"}, "env": {"name": "code", "args": {"cases": 2, "timeout_s": 3}},
                    "rl": {"steps": 2, "prompts_per_step": 3, "group_size": 2, "max_new_tokens": 12,
                           "entropy_coef": 0.01},
                    "eval": {"problems": 3, "samples": 2, "ks": [1, 2], "max_new_tokens": 12, "at_start": False}})
    from posttrain.runner import run

    summary = run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "code" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "rollout/samples" in r]
    assert summary["steps"] == 2 and len(train) == 2
    assert all(r["rollout/score_errors"] == 0 and r["rollout/samples"] == 6 for r in train)
    assert all(r["pg/entropy"] > 0 for r in train)  # the entropy bonus trained on every sample
