"""RL stage: a few steps on the tiny model change every parameter; every preset runs; dynamic sampling refills."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain import presets
from posttrain.config import validate
from posttrain.errors import UserError
from posttrain.runner import run

REQUIRED_METRICS = [
    "rollout/reward_mean", "rollout/pass_rate", "rollout/len_mean", "rollout/truncated_frac",
    "rollout/effective_groups_frac", "pg/clip_frac", "pg/entropy", "kl/value", "is/weight_max", "is/ess",
    "train/grad_norm", "time/generate_s", "time/score_s", "time/train_s", "perf/gen_tokens_per_s", "compute/flops",
]


def rl_config(tmp_path, name="rl", teacher=None, **rl):
    return validate({
        "recipe": "rl", "name": name, "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        **({"teacher": {"path": teacher}} if teacher else {}),
        "model": {"path": "tiny-test"}, "env": {"name": "arithmetic", "args": {"digits": 1}},
        "rl": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "lr": 1e-2,
               "micro_batch_size": 5, **rl},
        "eval": {"problems": 4, "samples": 2, "ks": [1, 2], "max_new_tokens": 4, "at_start": False},
    }, "test")


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rl_steps_change_every_parameter_and_log_every_metric(tmp_path, tiny_dir):
    # A constant reward would give zero advantages; use a reward with variance: continuous length-based reward
    # from a tiny test environment is not needed: random init samples differ, arithmetic rewards are mostly 0,
    # so use the entropy bonus and a KL term to guarantee a gradient on every parameter.
    cfg = rl_config(tmp_path, kl_coef=0.1, entropy_coef=0.01, kl_estimator="k2")
    run(cfg)
    before = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").state_dict()
    unchanged = [n for n, t in before.items() if torch.equal(t, after[n])]
    assert unchanged == []
    train_rows = [r for r in rows(cfg.run_dir) if "pg/loss" in r]
    assert len(train_rows) == 2
    for r in train_rows:
        missing = [m for m in REQUIRED_METRICS if m not in r]
        assert missing == []
        assert all(v is None or isinstance(v, str) or abs(v) < 1e30 for v in r.values())
        assert 0 < r["time/score_s"] <= r["time/generate_s"]  # the verifier's part of the collection
    assert (cfg.run_dir / "prompts.jsonl").exists()
    history = [json.loads(x) for x in (cfg.run_dir / "prompts.jsonl").read_text().splitlines()]
    # 2 steps x 4 prompts; 1-digit problems can repeat, so count visits rather than prompts
    assert sum(len(h["visits"]) for h in history) == 8 and sum(h["times_sampled"] for h in history) == 32
    assert all(h["first_solved_step"] is None or h["first_solved_step"] in (1, 2) for h in history)


@pytest.mark.slow
@pytest.mark.parametrize("preset", presets.names("rl"))
def test_every_preset_runs_a_few_steps(tmp_path, preset):
    # opd and kdrl distil from a teacher: the tiny preset itself will do for running (tests/stages/test_distillation.py)
    cfg = rl_config(tmp_path, name=preset, preset=preset, steps=2,
                    teacher="tiny-test" if preset in ("opd", "kdrl") else None)
    summary = run(cfg)
    assert summary["steps"] >= 2
    train_rows = [r for r in rows(cfg.run_dir) if r.get("stage") == "rl" and "rollout/samples" in r]
    assert len(train_rows) == 2
    assert all(r["rollout/samples"] > 0 for r in train_rows)


def test_stage_env_args_change_training_tasks_but_not_evaluation(tmp_path):
    cfg = rl_config(tmp_path, env_args={"digits": 2})
    run(cfg)
    history = [json.loads(x) for x in (cfg.run_dir / "prompts.jsonl").read_text().splitlines()]
    assert history and {h["difficulty"] for h in history} == {2}
    evaluated = json.loads((cfg.run_dir / "eval" / "rl.json").read_text())
    assert {p["difficulty"] for p in evaluated["per_problem"]} == {1}


@pytest.mark.parametrize("extra", [{}, {"mini_batches": 2, "epochs": 2, "aggregation": "seq_mean_token_mean"}])
def test_skipping_zero_advantage_samples_does_not_change_the_update(tmp_path, monkeypatch, extra):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "helpers"))
    finals = []
    for skip in (True, False):
        cfg = validate({**rl_config(tmp_path, name=f"skip{skip}").model_dump(mode="json"),
                        "env": {"name": "hostile_envs:ParityReward", "args": {"digits": 1}}}, "test")
        cfg = validate({**cfg.model_dump(mode="json"), "rl": {**cfg.rl.model_dump(mode="json"),
                                                               "skip_zero_advantage": skip, "steps": 2,
                                                               "group_size": 4, **extra}}, "test")
        run(cfg)
        finals.append((cfg.run_dir, AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").state_dict()))
    skipped = [r["train/skipped_frac"] for r in rows(finals[0][0]) if "train/skipped_frac" in r]
    assert any(0 < s < 1 for s in skipped)  # the test exercises a real mix
    # Equal up to float summation order: Adam divides by sqrt(v), so order noise in a near-zero gradient entry can
    # move that weight by a few thousandths of a step (lr = 1e-2 here; skipping also changes which rows share a
    # prompt forward, train/forward.py), hence atol 1e-4 -- 1% of one step. A wrongly skipped sample would move
    # many weights by a large fraction of lr.
    for name, tensor in finals[0][1].items():
        torch.testing.assert_close(tensor, finals[1][1][name], atol=1e-4, rtol=1e-5)


def test_entropy_controller_and_reference_reset_act_and_are_logged(tmp_path):
    # An entropy band far above anything reachable: the controller must raise eps_high every step, by its step.
    cfg = rl_config(tmp_path, steps=3, entropy_target=[50.0, 60.0], entropy_adapt_step=0.05,
                    entropy_adapt_bounds=[0.2, 0.3], kl_coef=0.01, ref_reset_every=2, ref_reset_optimizer=True)
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "pg/eps_high" in r]
    assert [round(r["pg/eps_high"], 6) for r in train] == [0.2, 0.25, 0.3]  # logged before each step's update
    log = (cfg.run_dir / "run.log").read_text()
    assert log.count("eps_high") == 2  # 0.2 -> 0.25 -> 0.3, then clamped at the bound: no further change
    resets = [r for r in rows(cfg.run_dir) if r.get("ctrl/ref_reset") == 1]
    assert len(resets) == 1 and "reference policy reset" in log and "optimizer state cleared" in log


@pytest.mark.parametrize("loss", ["clip_cov", "kl_cov"])
def test_the_covariance_losses_train_through_the_rl_stage(tmp_path, loss):
    """Clip-Cov and KL-Cov as rl.policy_loss: each step trains, with a finite loss, and reports the tokens it cut
    or leashed in pg/clip_frac: KL-Cov leashes at least one token a micro-batch; Clip-Cov cuts only tokens whose
    covariance lies in its band, which the tiny model's mostly-zero advantages may leave empty."""
    cfg = rl_config(tmp_path, policy_loss=loss, entropy_coef=0.01)  # the bonus keeps every sample training
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "pg/clip_frac" in r]
    assert len(train) == 2 and all(math.isfinite(r["pg/loss"]) for r in train)
    lowest = min(r["pg/clip_frac"] for r in train)
    assert max(r["pg/clip_frac"] for r in train) <= 1 and (lowest > 0 if loss == "kl_cov" else lowest >= 0)


def test_forking_tokens_train_a_fraction_of_the_tokens_and_say_so(tmp_path):
    """rl.forking_fraction = 0.2: every step that trained logs the fraction of its tokens that carried the policy
    gradient, at least 0.2 (ceil per micro-batch, at least one token each) and at most 1, and their entropy."""
    cfg = rl_config(tmp_path, forking_fraction=0.2, entropy_coef=0.01)  # the bonus keeps every sample training
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "pg/loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["pg/loss"]) for r in train)
    assert all(0.2 <= r["pg/forking_frac"] <= 1 and r["pg/forking_entropy"] >= 0 for r in train)


def test_the_entropy_controller_can_adapt_the_entropy_bonus_itself(tmp_path):
    """rl.entropy_adapt_arg = "entropy_coef": an adaptive entropy coefficient. With a band far above any entropy
    the coefficient rises by its step after every step that trained, up to its bound; pg/entropy_coef logs the
    coefficient each step trained with. A nonzero start keeps every sample training (the bonus has a gradient)."""
    cfg = rl_config(tmp_path, steps=3, entropy_coef=0.001, entropy_target=[50.0, 60.0], entropy_adapt_step=0.01,
                    entropy_adapt_arg="entropy_coef", entropy_adapt_bounds=[0.0, 0.015])
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "pg/entropy_coef" in r]
    assert [round(r["pg/entropy_coef"], 9) for r in train] == [0.001, 0.011, 0.015]
    assert (cfg.run_dir / "run.log").read_text().count("entropy_coef 0.") == 2  # then it sits at the bound


def test_kl_triggered_reference_reset_fires_on_exactly_the_steps_whose_kl_passed_the_threshold(tmp_path):
    """ProRL's trigger (rl.ref_reset_kl): a reset is logged at a step if and only if that step's measured KL to the
    reference (kl/value) exceeded the threshold. lr 1e-2 with an entropy bonus moves the policy off the
    reference in one step, so at least one step passes it."""
    cfg = rl_config(tmp_path, steps=4, kl_coef=0.1, kl_estimator="k2", entropy_coef=0.01, ref_reset_kl=1e-6)
    run(cfg)
    kl = {r["step"]: r["kl/value"] for r in rows(cfg.run_dir) if "kl/value" in r}
    resets = {r["step"] for r in rows(cfg.run_dir) if r.get("ctrl/ref_reset") == 1}
    assert len(kl) == 4 and resets and resets == {step for step, value in kl.items() if value > 1e-6}
    with pytest.raises(UserError, match="rl.ref_reset_kl: resets the reference policy"):
        rl_config(tmp_path, ref_reset_kl=0.1)  # no KL term, so no reference to reset


@pytest.mark.slow
def test_compiled_learner_trains_like_the_eager_one(tmp_path):
    """model.compile: the same first-step loss and entropy as eager (same weights, same samples), a checkpoint
    without compile-wrapper key prefixes, and every step still updates the model."""
    runs = {}
    for compiled in (False, True):
        cfg = rl_config(tmp_path, name=f"compile{compiled}", entropy_coef=0.01, recompute_old_logprobs=True)
        cfg = validate({**cfg.model_dump(mode="json"), "model": {"path": "tiny-test", "compile": compiled}}, "test")
        run(cfg)
        runs[compiled] = [r for r in rows(cfg.run_dir) if "pg/loss" in r]
        state = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").state_dict()
        assert not any("_orig_mod" in k for k in state)
    eager, compiled = runs[False][0], runs[True][0]
    for key in ("pg/loss", "pg/entropy", "pg/ratio_mean"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-5), key
    assert all(r["train/grad_norm"] > 0 for r in runs[True])


def test_steps_with_only_degenerate_groups_still_evaluate_and_checkpoint_on_schedule(tmp_path):
    # The random tiny model never solves arithmetic: every group is all-zero, the zero-variance filter drops them
    # all and no update happens. The evaluation and checkpoint scheduled at step 2 must still happen (a missing
    # point would silently thin out the compute curve that `posttrain fit` models).
    cfg = rl_config(tmp_path, steps=4, eval_every=2, group_filter="zero_variance")
    cfg = validate({**cfg.model_dump(mode="json"), "checkpoint": {"every": 2, "keep_last_n": 3}}, "test")
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "rollout/kept_samples" in r]
    assert len(train) == 4 and all(r["rollout/kept_samples"] == 0 for r in train)
    assert (cfg.run_dir / "eval" / "rl-step2.json").is_file()
    assert any(r.get("step") == 2 and "eval/pass@1" in r for r in rows(cfg.run_dir))
    assert (cfg.run_dir / "checkpoints" / "step_2").is_dir()
