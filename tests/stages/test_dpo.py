"""The dpo stage: preference losses over pairs from a file or built online from the policy's own samples."""

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from cli_runs import metrics, posttrain_run
from transformers import AutoModelForCausalLM

from posttrain import presets
from posttrain.algos import PREFERENCE_LOSSES
from posttrain.config import validate
from posttrain.errors import UserError
from posttrain.runner import run

PAIRS = [("1+1=", "2", "3"), ("2+2=", "4", "5"), ("3+1=", "4", "7"), ("2+5=", "7", "1")]


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def pair_file(tmp_path, pairs=PAIRS):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs))
    return path


def config(tmp_path, name, env="arithmetic", **dpo):
    return validate({
        "recipe": "dpo", "name": name, "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": "tiny-test"}, "env": {"name": env, "args": {"digits": 1}},
        "dpo": {"steps": 3, "lr": 1e-2, "pairs_per_step": 4, "prompts_per_step": 4, "group_size": 4,
                "max_new_tokens": 4, **dpo},
        "eval": {"problems": 4, "samples": 2, "ks": [1, 2], "max_new_tokens": 4, "at_start": False},
    }, "test")


def test_dpo_on_file_pairs_starts_at_log2_and_learns_the_preference(tmp_path):
    cfg = config(tmp_path, "file", data_path=str(pair_file(tmp_path)), steps=5)
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "dpo/loss" in r]
    assert len(train) == 5 and all(r["dpo/pairs"] == 4 for r in train)
    # the policy IS the reference at step 1: every log-ratio is 0, the loss -log σ(0) = log 2, no pair ranked
    assert train[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[0]["dpo/accuracy"] == 0.0 and train[0]["dpo/reward_margin"] == pytest.approx(0, abs=1e-6)
    assert train[-1]["dpo/loss"] < train[0]["dpo/loss"] and train[-1]["dpo/reward_margin"] > 0
    assert train[-1]["dpo/accuracy"] == 1.0
    assert train[-1]["dpo/chosen_logp"] - train[-1]["dpo/rejected_logp"] > train[0]["dpo/chosen_logp"] - train[0][
        "dpo/rejected_logp"]
    assert [r["train/examples_seen"] for r in train] == [4, 8, 12, 16, 20]
    last = rows(cfg.run_dir)[-1]
    assert last["compute/ref_flops"] > 0 and last["compute/train_flops"] > 0 and "compute/generate_flops" not in last


def test_the_micro_batch_split_never_changes_the_update(tmp_path):
    finals = []
    for mb in (2, 64):  # 2 rows: one pair per micro-batch; 64: all in one
        cfg = config(tmp_path, f"mb{mb}", data_path=str(pair_file(tmp_path)), micro_batch_size=mb, steps=2)
        run(cfg)
        finals.append(AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").state_dict())
        losses = [r["dpo/loss"] for r in rows(cfg.run_dir) if "dpo/loss" in r]
        finals.append(losses)
    assert finals[1] == pytest.approx(finals[3], rel=1e-5)
    for name, t in finals[0].items():
        torch.testing.assert_close(t, finals[2][name], atol=1e-4, rtol=1e-5)


def test_pair_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n"
                   + json.dumps({"prompt": "2+2=", "chosen": "4"}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: .*'rejected' is missing"):
        run(config(tmp_path, "bad", data_path=str(bad)))
    same = pair_file(tmp_path, [("1+1=", "2", "2")])
    with pytest.raises(UserError, match=r"pairs\.jsonl:1: 'chosen' and 'rejected' are the same"):
        run(config(tmp_path, "same", data_path=str(same)))
    with pytest.raises(UserError, match=r"dpo\.loss_args\.bta"):
        config(tmp_path, "x", loss_args={"bta": 0.1})
    with pytest.raises(UserError, match=r"dpo\.preset: 'dop' is not a known preset"):
        config(tmp_path, "x", preset="dop")


def test_online_pairs_come_from_scored_groups(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "helpers"))
    cfg = config(tmp_path, "online", env="hostile_envs:ParityReward", steps=2)
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if r.get("stage") == "dpo" and "dpo/pairs" in r]
    assert len(train) == 2 and all(0 < r["dpo/pairs"] <= 4 for r in train)
    # a pair per group with two different rewards: exactly the groups with variance
    assert all(r["dpo/pairs"] == round(r["rollout/effective_groups_frac"] * 4) for r in train)
    last = rows(cfg.run_dir)[-1]
    assert last["compute/generate_flops"] > 0 and last["compute/ref_flops"] > 0
    assert (cfg.run_dir / "samples.jsonl").read_text().strip()


def test_a_step_without_pairs_skips_the_update(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "helpers"))
    cfg = config(tmp_path, "none", env="hostile_envs:AlwaysCorrect", steps=1)
    run(cfg)
    assert [r["dpo/pairs"] for r in rows(cfg.run_dir) if "dpo/pairs" in r] == [0]
    assert "no pair; no update" in (cfg.run_dir / "run.log").read_text()
    before = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").state_dict()
    assert all(torch.equal(t, after[n]) for n, t in before.items())


@pytest.mark.parametrize("preset", presets.names("dpo"))
def test_every_preset_runs(tmp_path, preset):
    cfg = config(tmp_path, preset, data_path=str(pair_file(tmp_path)), preset=preset, steps=2)
    assert cfg.section("dpo").loss == preset
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "dpo/loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["dpo/loss"]) for r in train)
    # SimPO and ORPO have no reference model, so no reference forward passes in the ledger
    assert ("compute/ref_flops" in rows(cfg.run_dir)[-1]) == PREFERENCE_LOSSES.trait(preset, "needs_reference")


def test_presets_merge_with_the_recipe(tmp_path):
    d = config(tmp_path, "x", preset="simpo", loss_args={"gamma": 0.3}).section("dpo")
    assert d.loss == "simpo" and d.loss_args == {"beta": 2.0, "gamma": 0.3}
    d = config(tmp_path, "x", preset="simpo", loss="ipo").section("dpo")
    assert d.loss == "ipo" and d.loss_args == {"beta": 0.1}  # another loss: the preset's table does not apply
    assert presets.names("dpo") == ["cdpo", "dpo", "ipo", "orpo", "simpo"]


RECIPE = """
recipe = ["sft", "rl", "dpo"]
name = "crash"
seed = 3
threads = 1
[model]
path = "tiny-test"
[teacher]
path = "tiny-test"
[env]
name = "HOSTILE:ParityReward"
args = {digits = 1}
[sft]
steps = 2
batch_size = 8
[rl]
preset = "opd"
steps = 2
prompts_per_step = 4
group_size = 2
max_new_tokens = 4
[dpo]
steps = 4
prompts_per_step = 4
group_size = 4
max_new_tokens = 4
[eval]
problems = 4
samples = 2
ks = [1, 2]
max_new_tokens = 4
[checkpoint]
every = 1
keep_last_n = 2
"""


@pytest.mark.slow
def test_sigkill_in_distillation_and_dpo_then_resume_matches_an_uninterrupted_run(tmp_path):
    """The crash test of tests/e2e/test_crash_resume.py on an OPD stage (teacher) and an online DPO stage (reference,
    sampler): global steps 3-4 are OPD, 5-8 DPO."""
    recipe = tmp_path / "crash.toml"
    recipe.write_text(RECIPE.replace("HOSTILE", str(Path(__file__).parents[1] / "helpers" / "hostile_envs.py")))
    done = posttrain_run(recipe, tmp_path / "reference")
    assert done.returncode == 0, done.stderr
    expected = metrics(tmp_path / "reference" / "crash")
    assert any("distill/reverse_kl" in r for r in expected) and any("dpo/loss" in r for r in expected)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "reference" / "crash" / "final" / "model.safetensors")
    # a DPO step whose groups all tie makes no pair and has no train phase: kill in the last one that trains
    dpo_trained = [r["step"] - 1 for r in expected if r.get("dpo/pairs", 0) > 0]
    assert dpo_trained
    for fault in ("train:3", "generate:5", f"train:{dpo_trained[-1]}"):
        out = tmp_path / fault.replace(":", "-")
        crashed = posttrain_run(recipe, out, fault)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        resumed = posttrain_run(recipe, out)
        assert resumed.returncode == 0, resumed.stderr
        assert metrics(out / "crash") == expected, fault
        got = load_file(out / "crash" / "final" / "model.safetensors")
        assert all(torch.equal(t, got[n]) for n, t in weights.items()), fault


def test_pairs_from_a_csv_with_its_own_column_names(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("question,better,worse\n" + "".join(f"{p},{c},{r}\n" for p, c, r in PAIRS))
    cfg = config(tmp_path, "csv", data_path=str(path), steps=1,
                 data_columns={"prompt": "question", "chosen": "better", "rejected": "worse"})
    run(cfg)
    assert [r["dpo/pairs"] for r in rows(cfg.run_dir) if "dpo/loss" in r] == [4]
