"""The stage contract, for every registered stage (a new one is covered by being registered): run 2 steps with a
checkpoint after each, SIGKILL the process as the second step starts, run the same command again, and get what an
uninterrupted run gets: the same metric rows (less wall times), the same final weights and the same final trainer
state (the learner's optimizer, the stage's own state, the ledger's totals). runtime/loop.py owns the skeleton
this checks; the stage files hold only their methods."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from posttrain.stages import load_stages
from posttrain.train.checkpoint import latest_checkpoint, load_state

ROOT = Path(__file__).resolve().parents[2]
# `posttrain run` with the test-only stage registered first, as an installed plugin would be
HELPERS = Path(__file__).parents[1] / "helpers"
CLI = f"import sys; sys.path.insert(0, {str(HELPERS)!r}); import toy_stage; from posttrain.cli import main; main()"

# The smallest settings that exercise each built-in stage's state (reference weights, sampler, cursor, EMA); a
# stage not listed runs its defaults with steps = 2.
SMALL: dict[str, dict[str, Any]] = {
    "sft": {"steps": 2, "batch_size": 4, "eval_every": 1},
    "rl": {"steps": 2, "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 4, "kl_coef": 0.05,
           "eval_every": 1},
    "dpo": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "eval_every": 1},
    "rlp": {"steps": 2, "positions_per_step": 2, "group_size": 2, "thought_tokens": 3, "seq_len": 16,
            "eval_sequences": 2, "eval_every": 1},
    "pretrain": {"tokens": 2 * 4 * 16, "batch_size": 4, "seq_len": 16, "eval_sequences": 2, "warmup_steps": 1,
                 "eval_every": 1},
    "opd_offline": {"steps": 2, "batch_size": 4, "data_path": "pairs.jsonl", "eval_every": 1},
}


def toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # strings, numbers, booleans and lists are written alike


def recipe(stage: str, root: Path) -> Path:
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
                                              for a in range(3) for b in range(3)))
    sections = {
        "model": {"path": "tiny-test"},
        "env": {"name": "arithmetic", "args": {"digits": 1}, "reward": "format"},
        "eval": {"problems": 2, "samples": 2, "ks": [1, 2], "max_new_tokens": 3},
        "checkpoint": {"every": 1, "keep_last_n": 2},
        **({"teacher": {"path": "tiny-test"}} if stage == "opd_offline" else {}),
        stage: SMALL.get(stage, {"steps": 2}),
    }
    lines = [f'recipe = ["{stage}"]', f'name = "{stage}"', "seed = 5", "threads = 1"]
    for section, body in sections.items():
        lines += [f"[{section}]", *(f"{k} = {toml(v)}" for k, v in body.items())]
    path = root / f"{stage}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def posttrain_run(recipe_file: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "POSTTRAIN_FAULT"}
    if fault:
        env["POSTTRAIN_FAULT"] = fault
    return subprocess.run([sys.executable, "-c", CLI, "run", str(recipe_file), "--set", f"output_dir={out}"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
                          check=False)


def outcome(run_dir: Path) -> tuple[list[dict], dict, Any]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state = load_state(latest_checkpoint(run_dir / "checkpoints"))
    final = {"global_step": state.global_step, "stage_step": state.stage_step, "stage_done": state.stage_done,
             "learner": state.learner, "stage": state.stage, "totals": state.totals, "evals": state.evals}
    return ([{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows],
            load_file(run_dir / "final" / "model.safetensors"), final)


def assert_equal(want: Any, got: Any, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(want, got), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(want) == set(got), f"{where}: {sorted(want)} != {sorted(got)}"
        for k in want:
            assert_equal(want[k], got[k], f"{where}/{k}")
    elif isinstance(want, list | tuple):
        assert len(want) == len(got), where
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert_equal(a, b, f"{where}[{i}]")
    else:
        assert want == got, f"{where}: {want!r} != {got!r}"


@pytest.mark.slow
# Every registered stage, and the test-only plugin stage that the runs below register (tests/helpers/toy_stage.py; not in
# this process, whose registry other tests read)
@pytest.mark.parametrize("stage", [*load_stages().names(), "toy_prompt_lm"])
def test_sigkill_at_the_second_step_then_resume_equals_an_uninterrupted_run(stage, tmp_path):
    recipe_file = recipe(stage, tmp_path)
    whole = posttrain_run(recipe_file, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    crashed = posttrain_run(recipe_file, tmp_path / "crashed", fault="step:1")  # stage step 2 starts at global 1
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    run_dir = tmp_path / "crashed" / stage
    assert not (run_dir / "DONE").exists() and latest_checkpoint(run_dir / "checkpoints") is not None
    resumed = posttrain_run(recipe_file, tmp_path / "crashed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    want, got = outcome(tmp_path / "whole" / stage), outcome(run_dir)
    assert len(want[0]) >= 3 and want[2]["global_step"] == 2 and want[2]["stage_done"]
    assert_equal(want[0], got[0], "metrics")
    assert_equal(want[1], got[1], "final weights")
    assert_equal(want[2], got[2], "final state")
