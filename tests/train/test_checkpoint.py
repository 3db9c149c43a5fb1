"""Checkpoints: HF round trip, atomicity, rotation, and exact resume of a run."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import validate
from posttrain.errors import UserError
from posttrain.runner import run
from posttrain.train.checkpoint import (
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    rng_state,
    rotate,
    save_checkpoint,
)


def state_at(step: int) -> TrainerState:
    return TrainerState(global_step=step, stage_index=0, stage_step=step, stage_done=False, learner=None,
                        stage={"cursor": 3}, rng=rng_state(), totals={}, elapsed_s=0.0, evals={}, metrics_offset=0)


def test_checkpoint_round_trip_gives_identical_logits(tiny, tmp_path):
    model, tok = tiny
    path = save_checkpoint(tmp_path / "ckpts", 7, model, tok, state_at(7))
    again = AutoModelForCausalLM.from_pretrained(path)
    tok2 = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok2("<|user|>12+3=<|end|><|assistant|>", add_special_tokens=False).input_ids])
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert load_state(path).global_step == 7
    assert load_state(path).stage == {"cursor": 3}


def test_half_written_checkpoint_is_never_loaded(tiny, tmp_path):
    model, tok = tiny
    root = tmp_path / "ckpts"
    good = save_checkpoint(root, 1, model, tok, state_at(1))
    torn = root / ".tmp-step_2-999"  # what a crash mid-write leaves behind
    shutil.copytree(good, torn)
    (torn / "COMPLETE").unlink()
    incomplete = root / "step_3"  # a step dir without its marker
    shutil.copytree(good, incomplete)
    (incomplete / "COMPLETE").unlink()
    assert latest_checkpoint(root) == good
    assert not torn.exists()
    with pytest.raises(UserError, match="not a complete checkpoint"):
        load_state(incomplete)


def test_corrupt_trainer_state_is_a_user_error(tiny, tmp_path):
    model, tok = tiny
    path = save_checkpoint(tmp_path, 1, model, tok, state_at(1))
    (path / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="trainer_state.pt"):
        load_state(path)
    torch.save({"global_step": 1, "cursor": 3}, path / "trainer_state.pt")  # a dict from an older version
    with pytest.raises(UserError, match="another format.*--fresh"):
        load_state(path)


def test_rotation_keeps_the_newest(tiny, tmp_path):
    model, tok = tiny
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, tok, state_at(step))
    rotate(tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def tiny_run_config(tmp_path, **sft):
    return validate({
        "recipe": "sft", "name": "r", "output_dir": str(tmp_path), "seed": 1, "threads": 1,
        "model": {"path": "tiny-test"}, "env": {"name": "arithmetic", "args": {"digits": 2}},
        "sft": {"steps": 6, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3, **sft},
        "eval": {"problems": 4, "samples": 2, "ks": [1, 2], "max_new_tokens": 4, "at_start": False},
        "checkpoint": {"every": 2, "keep_last_n": 10},
    }, "test")


def without_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


def read_rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    cfg = tiny_run_config(tmp_path)
    run(cfg)
    run_dir = cfg.run_dir
    reference = read_rows(run_dir)
    final_weights = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    assert [r["step"] for r in reference if "sft/loss" in r] == [1, 2, 3, 4, 5, 6]

    # Simulate a crash after step 4: later checkpoints, the final model and the finish marker never happened,
    # and metrics.jsonl holds rows past the checkpoint that must not be duplicated.
    for step, path in list_checkpoints(run_dir / "checkpoints"):
        if step > 4:
            shutil.rmtree(path)
    for name in ("DONE", "summary.json"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "final")
    state = load_state(run_dir / "checkpoints" / "step_4")
    assert state.stage_step == 4 and state.stage["cursor"] == 32 and state.learner["optimizer"]["state"]

    run(cfg)
    assert without_time(read_rows(run_dir)) == without_time(reference)
    resumed = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    for name, tensor in final_weights.items():
        assert torch.equal(tensor, resumed[name]), name


def test_a_run_dir_with_a_different_config_is_refused(tmp_path):
    run(tiny_run_config(tmp_path, steps=2))
    with pytest.raises(UserError, match="sft.steps"):
        run(tiny_run_config(tmp_path, steps=3))
    summary = run(tiny_run_config(tmp_path, steps=3), fresh=True)
    assert summary["steps"] == 3
