"""The rlp stage end to end (a base model pretrained here, then RLP on the same corpus), its resume, and the
reward controls inside an RL run."""

import json

import torch
from resume_helpers import crash_after, metric_rows_without_time
from transformers import AutoModelForCausalLM

from posttrain.config import validate
from posttrain.report import write_report
from posttrain.runner import run


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rlp_config(tmp_path, name="rlp", every=0, **rlp):
    return validate({
        "recipe": ["pretrain", "rlp"], "name": name, "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": "tiny-test", "chat_template": False}, "env": {"name": "arithmetic", "args": {"digits": 2}},
        "pretrain": {"tokens": 24 * 16 * 20, "seq_len": 24, "batch_size": 16, "micro_batch_size": 16, "lr": 1e-2},
        "rlp": {"steps": 4, "positions_per_step": 4, "group_size": 4, "thought_tokens": 5, "target_tokens": 2,
                "seq_len": 24, "lr": 1e-3, "ema_decay": 0.5, "eval_every": 2, "eval_sequences": 4, **rlp},
        "eval": {"problems": 6, "samples": 2, "ks": [1, 2], "max_new_tokens": 4, "at_start": False},
        "checkpoint": {"every": every, "keep_last_n": 5},
    }, "test")


def test_rlp_trains_the_policy_on_thoughts_and_logs_its_metrics(tmp_path):
    cfg = rlp_config(tmp_path)
    run(cfg)
    rlp = [r for r in rows(cfg.run_dir) if r["stage"] == "rlp" and "rlp/info_gain" in r]
    assert len(rlp) == 4
    for r in rlp:
        assert 0 < r["rlp/thought_len"] <= 5 and r["rlp/info_gain_std"] > 0  # G thoughts differ in what they add
        assert r["rlp/ema_lag"] >= 0
    assert rlp[-1]["rlp/ema_lag"] > 0  # the policy moved and its EMA lags it
    assert abs(rlp[0]["rlp/drift_gain"]) < 1e-5  # before the first update the EMA is the policy
    assert rlp[-1]["compute/rlp_flops"] > rlp[0]["compute/rlp_flops"] > 0
    assert all(rlp[-1][f"compute/{k}_flops"] > 0 for k in ("generate", "old", "ref", "train"))
    assert any("rlp/eval_loss" in r for r in rows(cfg.run_dir))
    pretrained = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "checkpoints" / "step_20").state_dict()
    final = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").state_dict()
    assert sum(not torch.equal(pretrained[k], final[k]) for k in final) == len(final)  # RLP moved every tensor
    assert json.loads((cfg.run_dir / "eval" / "rlp.json").read_text())["stage"] == "rlp"
    page = write_report([cfg.run_dir]).read_text()  # the report shows both stages like the others
    assert "The pretrain stage" in page and "The rlp stage" in page
    assert (cfg.run_dir / "report_pretrain.png").is_file() and (cfg.run_dir / "report_rlp.png").is_file()


def test_rlp_resumes_exactly(tmp_path):
    cfg = rlp_config(tmp_path, every=2, eval_every=0)
    run(cfg)
    reference = metric_rows_without_time(cfg.run_dir)
    final = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").state_dict()
    crash_after(cfg.run_dir, 22)  # the rlp stage's step 2 (the pretrain stage ran 20)
    run(cfg)
    assert metric_rows_without_time(cfg.run_dir) == reference
    resumed = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").state_dict()
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_a_reward_control_feeds_training_while_pass_rate_and_eval_stay_the_verifiers(tmp_path):
    cfg = validate({
        "recipe": "rl", "name": "ctrl", "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": "tiny-test"}, "env": {"name": "arithmetic", "args": {"digits": 1}, "reward": "random",
                                                 "reward_args": {"rate": 0.5}},
        "rl": {"steps": 3, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 3, "lr": 1e-3},
        "eval": {"problems": 4, "samples": 2, "ks": [1, 2], "max_new_tokens": 3, "at_start": False},
    }, "test")
    run(cfg)
    rl = [r for r in rows(cfg.run_dir) if "rollout/reward_mean" in r]
    assert len(rl) == 3
    # 16 samples of a random-init model: almost all wrong, yet about half are rewarded
    assert sum(r["rollout/reward_mean"] for r in rl) / 3 > 0.2
    assert all(r["rollout/verifier_reward_mean"] == r["rollout/pass_rate"] for r in rl)
    samples = [json.loads(x) for x in (cfg.run_dir / "samples.jsonl").read_text().splitlines()]
    assert any(s["reward"] == 1.0 and not s["correct"] for s in samples)
