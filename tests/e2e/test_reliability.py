"""Reliability guarantees (docs/reliability.md): isolated rewards, numerical guards, stall detection, hostile
inputs, determinism."""

import json
import math
import time
from pathlib import Path

import pytest
import torch

from posttrain.algos import POLICY_LOSSES
from posttrain.config import validate
from posttrain.errors import UserError
from posttrain.runner import run
from posttrain.tracking.heartbeat import Heartbeat
from posttrain.train.checkpoint import list_checkpoints, load_state
from posttrain.train.guards import UpdateGuard

HERE = Path(__file__).parents[1] / "helpers"  # the test helpers


def config(tmp_path, name="r", recipe="rl", env="arithmetic", env_extra=None, **rl):
    stages = {"sft": {"steps": 3, "batch_size": 8, "micro_batch_size": 8},
              "rl": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, **rl}}
    used = [recipe] if isinstance(recipe, str) else recipe
    return validate({
        "recipe": recipe, "name": name, "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": "tiny-test"}, "env": {"name": env, "args": {"digits": 1}, **(env_extra or {})},
        **{k: v for k, v in stages.items() if k in used},
        "eval": {"problems": 4, "samples": 2, "ks": [1, 2], "max_new_tokens": 4, "at_start": False},
        "checkpoint": {"every": 1, "keep_last_n": 3},
    }, "test")


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def hostile_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("PYTHONPATH", str(HERE))  # for scoring worker processes


def test_failing_verifier_calls_cost_only_their_sample(tmp_path, hostile_path):
    cfg = config(tmp_path, env="hostile_envs:FlakyArithmetic", env_extra={"max_error_frac": 0.6})
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "rollout/score_errors" in r]
    assert len(train) == 2 and sum(r["rollout/score_errors"] for r in train) > 0
    assert all(r["rollout/reward_mean"] == r["rollout/reward_mean"] for r in train)  # no NaN leaked in
    assert "could not be scored" in (cfg.run_dir / "run.log").read_text()


def test_a_step_with_too_many_failures_stops_the_run(tmp_path, hostile_path):
    cfg = config(tmp_path, env="hostile_envs:BrokenArithmetic")
    with pytest.raises(UserError, match=r"could not be scored.*max_error_frac.*always broken"):
        run(cfg)


@pytest.mark.slow
def test_a_hanging_verifier_cannot_block_the_run(tmp_path, hostile_path):
    cfg = config(tmp_path, env="hostile_envs:HangingArithmetic", env_extra={"score_timeout_s": 0.5,
                                                                               "max_error_frac": 1.0})
    t0 = time.time()
    run(cfg)
    assert time.time() - t0 < 120
    errors = [r["rollout/score_errors"] for r in rows(cfg.run_dir) if "rollout/score_errors" in r]
    assert sum(errors) > 0


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    def nan_loss(x):
        return x.logprobs * float("nan"), {"clip_frac": torch.zeros_like(x.mask), "ratio": torch.ones_like(x.mask)}

    monkeypatch.setitem(POLICY_LOSSES._entries, "nan_loss", nan_loss)
    cfg = config(tmp_path, policy_loss="nan_loss", steps=5, max_bad_steps=2, entropy_coef=0.01)
    with pytest.raises(UserError, match=r"rl step 2: non-finite loss.*2 consecutive bad updates"):
        run(cfg)
    log = (cfg.run_dir / "run.log").read_text()
    assert "rl step 1: non-finite loss" in log and "update skipped" in log


def test_update_guard_names_the_offending_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model(torch.ones(1, 2)).sum().backward()
    model[1].weight.grad[0, 0] = float("inf")
    guard = UpdateGuard(max_bad_steps=2)
    reason = guard.check(model, loss=1.0, grad_norm=float("inf"), where="step 7")
    assert "step 7" in reason and "1.weight" in reason
    assert guard.check(model, loss=1.0, grad_norm=1.0, where="step 8") is None and guard.bad_steps == 0


def test_stall_watchdog_names_the_phase_and_what_it_waits_on(tmp_path):
    messages = []
    hb = Heartbeat(tmp_path, stall_timeout_s=0.2, on_stall=messages.append)
    hb.phase("score", "verifier of countdown on 256 completions", step=12)
    time.sleep(0.8)
    hb.close()
    assert len(messages) == 1
    assert "'score'" in messages[0] and "step 12" in messages[0] and "countdown on 256" in messages[0]
    beat = json.loads((tmp_path / "heartbeat.json").read_text())
    assert beat["phase"] == "finished"


def test_prompt_longer_than_the_context_is_a_clear_error(tmp_path, hostile_path):
    with pytest.raises(UserError, match=r"prompt of \d+ tokens does not fit the model's context of 512"):
        run(config(tmp_path, env="hostile_envs:Verbose"))


@pytest.mark.parametrize("recipe", ["sft", "rl"])
def test_an_empty_environment_is_a_clear_error(tmp_path, hostile_path, recipe):
    with pytest.raises(UserError, match="no train"):
        run(config(tmp_path, recipe=recipe, env="hostile_envs:Empty"))


def test_disk_full_on_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import posttrain.train.checkpoint as ckpt

    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    cfg = config(tmp_path)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        run(cfg)
    found = list_checkpoints(cfg.run_dir / "checkpoints")
    assert [s for s, _ in found] == [1]
    assert load_state(found[0][1]).global_step == 1
    assert not list((cfg.run_dir / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert run(cfg)["steps"] == 2  # free space, re-run: it resumes and finishes


def without_time(rs):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rs]


@pytest.mark.precision
def test_same_recipe_and_seed_give_identical_metrics(tmp_path):
    a = config(tmp_path / "a", recipe=["sft", "rl"], kl_coef=0.05)
    b = config(tmp_path / "b", recipe=["sft", "rl"], kl_coef=0.05)
    run(a)
    run(b)
    assert without_time(rows(a.run_dir)) == without_time(rows(b.run_dir))
    c = validate({**a.model_dump(mode="json"), "seed": 1, "output_dir": str(tmp_path / "c")}, "test")
    run(c)
    assert without_time(rows(c.run_dir)) != without_time(rows(a.run_dir))


def test_one_metrics_reader_tolerates_only_a_cut_last_line(tmp_path):
    from posttrain.tracking.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "x"')  # a crash mid-write
    notes = []
    assert [r["step"] for r in read_metrics(tmp_path, notes=notes)] == [1, 2] and "incomplete" in notes[0]
    path.write_text('{"step": 1}\n{"step": 2, "x"\n{"step": 3}\n')  # damage in the middle is not a crash
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(tmp_path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: expected a JSON object"):
        read_metrics(tmp_path)
    path.write_bytes(b'{"step": 1}\n\xff\xfe\n')
    with pytest.raises(UserError, match="metrics.jsonl: not UTF-8"):
        read_metrics(tmp_path)


def test_a_step_that_trained_nothing_logs_no_entropy_or_ratios(tmp_path, hostile_path):
    """Means over the tokens that trained are absent, not 0, on a step where no token trained (the report would
    draw a 0 entropy as a collapse); the step itself is still logged with its skipped fraction."""
    cfg = config(tmp_path, env="hostile_envs:AlwaysCorrect")  # group_filter "none": the groups reach the update
    run(cfg)
    rl = [r for r in rows(cfg.run_dir) if r.get("stage") == "rl" and "train/skipped_frac" in r]
    assert rl and all(r["train/skipped_frac"] == 1.0 for r in rl)
    for r in rl:
        assert not {"pg/entropy", "pg/clip_frac", "pg/ratio_mean", "kl/value"} & set(r), r
    assert all("train/tokens_total" in r for r in rl)  # a running total, named as one


@pytest.mark.parametrize("bf16", [False, True])
def test_the_local_engines_logprobs_are_checked_against_the_learners_every_step(tmp_path, bf16):
    """With the sampler's logprobs as PPO denominators (the local engine's default), a sampled row per
    mismatch_check_every is recomputed by the learner and the gap logged, its FLOPs in the ledger. In fp32 the
    engine and the learner compute the same numbers, so the gap is ~0; in bf16 it is measured, whatever it is."""
    cfg = config(tmp_path, mismatch_check_every=4)
    cfg = validate({**cfg.model_dump(mode="json"), "model": {"path": "tiny-test", "bf16": bf16}}, "test")
    run(cfg)
    rl = [r for r in rows(cfg.run_dir) if r.get("stage") == "rl" and "train/skipped_frac" in r]
    assert rl and all(r["is/mismatch_rows"] == 4 for r in rl)  # 16 completions, 1 in 4
    for r in rl:
        assert 0 <= r["is/logprob_diff_mean"] <= r["is/logprob_diff_max"] and math.isfinite(r["is/mismatch_kl"])
        if not bf16:
            assert r["is/logprob_diff_max"] < 1e-3
    assert rl[-1]["compute/mismatch_flops"] > 0
