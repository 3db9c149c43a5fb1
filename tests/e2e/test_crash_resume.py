"""Crash-exact resume: SIGKILL a real `posttrain run` at several points, restart it, and get the same metrics,
step for step, as an uninterrupted run (no step lost, none duplicated), and the same final weights."""

import json
import signal
from pathlib import Path

import pytest
import torch
from cli_runs import metrics, posttrain_run
from safetensors.torch import load_file
from tiny_recipes import changed, tiny_sft_rl, write_recipe

# 4 SFT steps then 4 RL steps of 4x4 with a KL penalty, a checkpoint every 2 steps: the crash lands mid-stage
CRASH = tiny_sft_rl(name="crash", seed=3, sft={"steps": 4, "micro_batch_size": 4},
                    rl={"steps": 4, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "kl_coef": 0.05},
                    eval={"problems": 4, "max_new_tokens": 4}, checkpoint={"every": 2, "keep_last_n": 2})


def crash_recipe(path: Path, **changes) -> Path:
    """CRASH with `changes` (as tiny_recipes.changed), written to path."""
    return write_recipe(path, changed(CRASH, changes))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    recipe = crash_recipe(root / "crash.toml")
    proc = posttrain_run(recipe, root / "reference")
    assert proc.returncode == 0, proc.stderr
    run_dir = root / "reference" / "crash"
    return recipe, metrics(run_dir), load_file(run_dir / "final" / "model.safetensors")


# global step at which the phase is entered: SFT steps 1-4 are global 1-4, RL steps 1-4 are global 5-8
FAULTS = [
    "train:2",  # SFT step 3, during its forward/backward and optimizer step, before the first checkpoint
    "checkpoint_write:4",  # writing the SFT stage's final checkpoint (model written, state not yet)
    "generate:5",  # RL step 2, during generation
    "train:6",  # RL step 3, during the update
    "checkpoint_write:8",  # writing the last checkpoint
]


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_sigkill_then_resume_matches_an_uninterrupted_run(reference, tmp_path, fault):
    recipe, expected, expected_weights = reference
    crashed = posttrain_run(recipe, tmp_path, fault)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    run_dir = tmp_path / "crash"
    assert not (run_dir / "DONE").exists()
    beat = json.loads((run_dir / "heartbeat.json").read_text())
    assert f"{beat['phase']}:{beat['step']}" == fault or fault.startswith("checkpoint_write")
    resumed = posttrain_run(recipe, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run_dir) == expected
    weights = load_file(run_dir / "final" / "model.safetensors")
    for name, tensor in expected_weights.items():
        assert torch.equal(tensor, weights[name]), name
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def visits(run_dir: Path) -> set[tuple[str, int]]:
    """(task id, step) of every prompt the RL stage trained on."""
    rows = [json.loads(x) for x in (run_dir / "prompts.jsonl").read_text().splitlines()]
    return {(r["id"], step) for r in rows for step, _ in r["visits"]}


@pytest.mark.slow
def test_sigkill_under_asynchronous_rl_resumes_with_the_in_flight_prompts_regenerated(tmp_path):
    recipe = crash_recipe(tmp_path / "async.toml", rollout={"max_staleness": 1})
    assert posttrain_run(recipe, tmp_path / "reference").returncode == 0
    expected = metrics(tmp_path / "reference" / "crash")
    # RL step 3 (global 7) while training; the producer has already generated step 4 from version 6
    crashed = posttrain_run(recipe, tmp_path / "crashed", "train:6")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    resumed = posttrain_run(recipe, tmp_path / "crashed")
    assert resumed.returncode == 0, resumed.stderr
    run_dir = tmp_path / "crashed" / "crash"
    got = metrics(run_dir)
    steps = [r["step"] for r in got if "pg/loss" in r]
    assert steps == [r["step"] for r in expected if "pg/loss" in r] == [5, 6, 7, 8]  # none lost, none twice
    last_checkpoint = 6
    assert [r for r in got if r["step"] <= last_checkpoint] == [r for r in expected if r["step"] <= last_checkpoint]
    # the steps in flight at the crash are re-generated from the checkpoint: the same prompts (sampler state),
    # sampled by the checkpoint's weights, so the first one after the resume is fresh and then k = 1 again
    stale = {r["step"]: r["rollout/staleness_max"] for r in got if "pg/loss" in r}
    assert stale == {5: 0, 6: 1, 7: 0, 8: 1}
    assert visits(run_dir) == visits(tmp_path / "reference" / "crash")


@pytest.mark.slow
def test_sigkill_with_an_adaptive_curriculum_resumes_exactly(tmp_path):
    """PCL over a pool of 6 prompts: its value model's weights, rng and the replayed bank must all come back."""
    recipe = crash_recipe(tmp_path / "pcl.toml",
                          rl={"sampler": "pcl", "sampler_args": {"pool_size": 6, "candidates": 2}})
    assert posttrain_run(recipe, tmp_path / "reference").returncode == 0
    expected = metrics(tmp_path / "reference" / "crash")
    assert any(k.startswith("curriculum/pred_abs_err") for r in expected for k in r)
    crashed = posttrain_run(recipe, tmp_path / "crashed", "train:6")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    resumed = posttrain_run(recipe, tmp_path / "crashed")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(tmp_path / "crashed" / "crash") == expected
    history = (tmp_path / "crashed" / "crash" / "prompts.jsonl").read_text()
    assert history == (tmp_path / "reference" / "crash" / "prompts.jsonl").read_text()
    assert len(history.splitlines()) <= 6  # the pool: prompts recur instead of new ones being drawn


def sharded(path: Path, world_size: int, launch: str = "local") -> Path:
    """The recipe with a sharded learner, in fp32 (the comparisons across world sizes are to float rounding)."""
    return crash_recipe(path, model={"bf16": False}, learner={"world_size": world_size, "launch": launch})


@pytest.mark.slow
def test_a_sharded_learner_resumes_exactly_and_in_another_world_size(tmp_path):
    """2 ranks, SIGKILLed in an RL update, resumed by 2: identical. Killed by 2 in SFT, resumed by 1 process and
    killed again in RL, resumed by 2 Ray actors: the same run to float rounding (the shards re-cut each time)."""
    two, one, on_ray = tmp_path / "two.toml", tmp_path / "one.toml", tmp_path / "ray.toml"
    sharded(two, 2)
    sharded(one, 1)
    sharded(on_ray, 2, launch="ray")
    assert posttrain_run(two, tmp_path / "reference").returncode == 0
    expected = metrics(tmp_path / "reference" / "crash")
    expected_weights = load_file(tmp_path / "reference" / "crash" / "final" / "model.safetensors")
    assert posttrain_run(two, tmp_path / "same", "train:6").returncode == -signal.SIGKILL
    assert (tmp_path / "same" / "crash" / "checkpoints" / "step_6" / "learner_shards" / ".metadata").is_file()
    assert posttrain_run(two, tmp_path / "same").returncode == 0
    assert metrics(tmp_path / "same" / "crash") == expected
    weights = load_file(tmp_path / "same" / "crash" / "final" / "model.safetensors")
    assert all(torch.equal(t, weights[name]) for name, t in expected_weights.items())

    run_dir = tmp_path / "mixed" / "crash"
    assert posttrain_run(two, tmp_path / "mixed", "train:2").returncode == -signal.SIGKILL  # resumes from step_2
    assert posttrain_run(one, tmp_path / "mixed", "train:6").returncode == -signal.SIGKILL  # step_6 by 1 process
    resumed = posttrain_run(on_ray, tmp_path / "mixed")
    assert resumed.returncode == 0, resumed.stderr
    starts = json.loads((run_dir / "config.json").read_text())["starts"]
    assert [(s["learner"]["world_size"], s["learner"]["launch"]) for s in starts] == [(2, "local"), (1, "local"),
                                                                                      (2, "ray")]
    got = metrics(run_dir)
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in expected]
    # abs 1e-4: the RL steps earn no reward here, so their gradient is the KL term's at the reference (zero up to
    # rounding: norms of 1e-5 that differ between layouts); the losses, O(1), are held to 1e-4 of their size
    for g, e in zip(got, expected, strict=True):
        for key, value in e.items():
            assert g[key] == (pytest.approx(value, rel=1e-4, abs=1e-4) if isinstance(value, float) else value), key
    # The weights: Adam turns those rounding-level RL gradients into full-size steps of random sign (each element
    # moves by about lr whatever its gradient), so the layouts' final weights differ by 2% of the run's update
    # (measured); the SFT part, where the gradient is real, is held by the losses above
    from posttrain.models import load_model, resolve_model_path

    start = load_model(resolve_model_path("tiny-test", seed=3)).state_dict()
    weights = load_file(run_dir / "final" / "model.safetensors")
    update = torch.cat([(t - start[name]).flatten() for name, t in expected_weights.items()])
    gap = torch.cat([(weights[name] - t).flatten() for name, t in expected_weights.items()])
    assert float(update.norm()) > 0.5 and float(gap.norm()) < 0.05 * float(update.norm())
