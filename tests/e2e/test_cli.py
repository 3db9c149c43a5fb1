"""The CLI as a user runs it, in subprocesses, on a tiny budget."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "model.path=tiny-test", "--set", "model.bf16=false", "--set", "eval.problems=4",
        "--set", "eval.samples=2", "--set", "eval.ks=[1, 2]", "--set", "threads=1"]


def posttrain(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], capture_output=True, text=True, check=False,
                          cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}")
    return proc


@pytest.mark.slow
def test_run_eval_report_through_the_cli(tmp_path):
    posttrain("run", "recipes/sft-tiny.toml", *TINY, "--set", "sft.steps=3", "--set", f"output_dir={tmp_path}",
              "--set", "sft.eval_every=0")
    run_dir = tmp_path / "sft-tiny"
    for name in ("config.toml", "config.json", "metrics.jsonl", "summary.json", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json", "eval/base.json", "eval/sft.json"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tensorboard").glob("events.*"))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "sft/loss" in r]
    assert steps == [1, 2, 3]
    assert all(k in rows[1] for k in ("time/elapsed_s", "sft/loss", "train/lr", "train/grad_norm", "train/tokens_total"))

    again = posttrain("run", "recipes/sft-tiny.toml", *TINY, "--set", "sft.steps=3", "--set",
                      f"output_dir={tmp_path}", "--set", "sft.eval_every=0")
    assert "already finished" in again.stderr

    proc = posttrain("eval", run_dir / "final", "--env", "arithmetic", "--env-arg", "digits=2", "--problems", "5",
                     "--n", "4", "--k", "1,4", "--max-new-tokens", "4")
    assert "pass@4" in proc.stdout
    result = json.loads((run_dir / "eval" / "adhoc" / "arithmetic-final-eval-n4.json").read_text())
    assert result["problems"] == 5 and len(result["per_problem"]) == 5
    assert all(p["n"] == 4 and 0 <= p["c"] <= 4 for p in result["per_problem"])


@pytest.mark.slow
def test_user_errors_are_one_line_naming_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('recipe = "sft"\n[sft]\nstepz = 3\n')
    proc = posttrain("run", bad, check=False)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "sft.stepz" in lines[0] and str(bad) in lines[0] and "Traceback" not in proc.stderr
    proc = posttrain("run", "recipes/sft-tiny.toml", "--set", "sft.lr=-1", check=False)
    assert proc.returncode == 2 and "sft.lr" in proc.stderr
    proc = posttrain("--debug", "run", bad, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.slow
def test_envs_lists_the_builtins():
    out = posttrain("envs").stdout
    for name in ("arithmetic", "strings", "countdown", "sorting"):
        assert name in out


def test_docs_reference_is_current():
    from posttrain.docs import recipe_reference

    committed = (ROOT / "docs" / "recipes.md").read_text()
    assert committed == recipe_reference(), "docs/recipes.md is stale: run `posttrain docs -o docs/recipes.md`"


def test_every_config_key_is_documented():
    from pydantic import BaseModel

    from posttrain.config import RunConfig

    def walk(model):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from walk(ann)
            else:
                yield name, field

    undocumented = [name for name, field in walk(RunConfig) if not field.description]
    assert undocumented == []
