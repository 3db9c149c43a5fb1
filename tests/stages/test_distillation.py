"""Distillation in the RL stage ([teacher], the reverse_kl advantage, KDRL's teacher term) and `distill-data`."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import validate
from posttrain.errors import UserError
from posttrain.runner import run


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A real teacher: tiny-test after a short SFT on the arithmetic task (same tokenizer, another distribution)."""
    out = tmp_path_factory.mktemp("teacher")
    run(validate({"recipe": "sft", "name": "teacher", "output_dir": str(out), "threads": 1,
                  "model": {"path": "tiny-test"}, "env": {"name": "arithmetic", "args": {"digits": 1}},
                  "sft": {"steps": 40, "batch_size": 16, "lr": 1e-2},
                  "eval": {"problems": 2, "samples": 1, "ks": [1], "max_new_tokens": 2, "at_start": False}}, "t"))
    return out / "teacher" / "final"


def config(tmp_path, name, teacher, env="arithmetic", **rl):
    return validate({
        "recipe": "rl", "name": name, "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": "tiny-test"}, "env": {"name": env, "args": {"digits": 1}},
        **({"teacher": {"path": str(teacher)}} if teacher else {}),
        "rl": {"steps": 2, "prompts_per_step": 4, "group_size": 2, "max_new_tokens": 6, "lr": 1e-2,
               "micro_batch_size": 8, **rl},
        "eval": {"problems": 4, "samples": 2, "ks": [1, 2], "max_new_tokens": 4, "at_start": False},
    }, "test")


def test_opd_against_the_student_itself_is_a_zero_signal_and_the_teacher_is_counted(tmp_path, tiny_dir):
    cfg = config(tmp_path, "self", tiny_dir, preset="opd")
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "distill/reverse_kl" in r]
    assert len(train) == 2
    # Step 1 samples the starting weights, which ARE the teacher: the signal is zero up to float rounding. (Adam then
    # turns even a 1e-7 gradient into a full lr-sized step, so step 2's student is no longer the teacher.)
    assert abs(train[0]["distill/reverse_kl"]) < 1e-6 and train[0]["rollout/adv_abs_mean"] < 1e-5
    assert abs(train[1]["distill/reverse_kl"]) > 1e-4
    last = rows(cfg.run_dir)[-1]
    assert last["compute/teacher_flops"] > 0 and all(r["time/teacher_s"] >= 0 for r in train)
    kinds = sum(v for k, v in last.items() if k.startswith("compute/") and k.endswith("_flops")
                and k not in ("compute/flops", "compute/rl_flops", "compute/wasted_flops"))
    assert last["compute/flops"] == pytest.approx(kinds)  # the teacher's passes are part of all the work


def exact_reverse_kl(student, teacher, seqs):
    """Mean over the completion tokens of KL(student || teacher) of the full next-token distributions."""
    total = n = 0.0
    with torch.no_grad():
        for p, c in zip(*seqs, strict=True):
            ids = torch.tensor([p + c])
            s, t = (torch.log_softmax(m.eval()(ids).logits[0, len(p) - 1 : -1].float(), -1) for m in (student, teacher))
            total += float((s.exp() * (s - t)).sum())
            n += len(c)
    return total / n


def test_opd_pulls_the_student_towards_the_teacher(tmp_path, tiny_dir, teacher_dir):
    cfg = config(tmp_path, "opd", teacher_dir, preset="opd", steps=20, lr=3e-3, prompts_per_step=16)
    run(cfg)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    # fixed sequences: the prompts and completions the run logged
    logged = [json.loads(x) for x in (cfg.run_dir / "samples.jsonl").read_text().splitlines()]
    from posttrain.models import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    seqs = ([tok(x["prompt"], add_special_tokens=False).input_ids for x in logged], [x["token_ids"] for x in logged])
    assert len(seqs[0]) >= 8 and all(seqs[1])
    before = exact_reverse_kl(AutoModelForCausalLM.from_pretrained(tiny_dir), teacher, seqs)
    after = exact_reverse_kl(AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final"), teacher, seqs)
    assert after < 0.5 * before, (before, after)  # measured: 6.28 -> 1.54 nats per token
    sampled = [r["distill/reverse_kl"] for r in rows(cfg.run_dir) if "distill/reverse_kl" in r]
    assert sum(sampled[-3:]) < sum(sampled[:3])


def test_kdrl_anneals_beta_and_masks_correct_samples(tmp_path, teacher_dir, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "helpers"))
    cfg = config(tmp_path, "kdrl", teacher_dir, preset="kdrl", steps=3)
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "distill/coef" in r]
    assert [r["distill/coef"] for r in train] == pytest.approx([5e-3, 5e-3 - 4e-3 / 3, 5e-3 - 8e-3 / 3])
    assert all(r["distill/teacher_kl"] > 0 for r in train)  # arithmetic from scratch: nearly every sample fails
    # every answer correct: reward-guided masking leaves no sample for the teacher term
    cfg = config(tmp_path, "kdrl-all-correct", teacher_dir, env="hostile_envs:AlwaysCorrect", preset="kdrl")
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "distill/coef" in r]
    # the teacher KL is a mean over the tokens that trained: none did, so it is absent, not 0
    assert all(r["distill/masked_frac"] == 1.0 and "distill/teacher_kl" not in r for r in train)
    assert all(r["train/skipped_frac"] == 1.0 for r in train)  # zero advantage, no teacher term: nothing to run
    cfg = config(tmp_path, "kdrl-unmasked", teacher_dir, env="hostile_envs:AlwaysCorrect", preset="kdrl",
                 teacher_kl_mask="all")
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "distill/coef" in r]
    assert all(r["distill/masked_frac"] == 0.0 and r["distill/teacher_kl"] > 0 for r in train)
    assert all(r["train/skipped_frac"] == 0.0 for r in train)


def test_a_teacher_is_required_and_must_share_the_tokenizer(tmp_path, tiny_dir):
    with pytest.raises(UserError, match=r"rl\.advantage: needs a teacher"):
        config(tmp_path, "x", None, advantage="reverse_kl")
    with pytest.raises(UserError, match=r"rl\.teacher_kl_coef: needs a teacher"):
        config(tmp_path, "x", None, teacher_kl_coef=0.1)
    with pytest.raises(UserError, match=r"rl\.advantage_args\.reward_advantage"):
        config(tmp_path, "x", tiny_dir, advantage="reverse_kl", advantage_args={"reward_advantage": "grpoo"})
    from posttrain.models import load_tokenizer

    other = tmp_path / "other-teacher"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(other)
    tok = load_tokenizer(tiny_dir)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(other)
    cfg = config(tmp_path, "mismatch", other, preset="opd")
    with pytest.raises(UserError, match=r"teacher\.path=.*the teacher's tokenizer has \d+ tokens, the policy's"):
        run(cfg)
    assert not (tmp_path / "mismatch").exists()  # checked before the run directory is made
    with pytest.raises(UserError, match=r"teacher\.path='nowhere': not a directory"):
        run(config(tmp_path, "missing", "nowhere", preset="opd"))


def test_distill_data_keeps_verified_teacher_answers_and_sft_trains_on_them(tmp_path, tiny_dir, monkeypatch):
    from pathlib import Path

    from rich.console import Console

    from posttrain.commands.distill_data import distill_data

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "helpers"))
    out = tmp_path / "data" / "teacher.jsonl"
    meta = distill_data(str(tiny_dir), out, env="hostile_envs:ParityReward", env_args=["digits=3"], prompts=40,
                        samples=4, keep=2, temperature=1.0, max_new_tokens=6, seed=0, chat_template=None,
                        console=Console(quiet=True))
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert meta["rows"] == len(written) and 0 < len(written) <= 80
    assert all(len(r["completion"]) % 2 == 0 for r in written)  # only what the verifier accepted
    per_task: dict[str, list[str]] = {}
    for r in written:
        per_task.setdefault(r["task"], []).append(r["completion"])
    assert all(len(v) <= 2 and len(set(v)) == len(v) for v in per_task.values())  # at most `keep`, distinct
    assert meta["tasks_solved"] == len(per_task) and meta["prompts"] == 40
    assert meta["compute/generate_flops"] > 0
    assert json.loads((tmp_path / "data" / "teacher.meta.json").read_text()) == meta
    cfg = validate({"recipe": "sft", "name": "on-teacher", "output_dir": str(tmp_path), "threads": 1,
                    "model": {"path": "tiny-test"}, "env": {"name": "arithmetic", "args": {"digits": 1}},
                    "sft": {"steps": 2, "batch_size": 8, "data_path": str(out)},
                    "eval": {"problems": 2, "samples": 1, "ks": [1], "max_new_tokens": 2, "at_start": False}},
                   "test")
    run(cfg)
    assert [r["train/examples_seen"] for r in rows(cfg.run_dir) if "sft/loss" in r] == [8, 16]
    with pytest.raises(UserError, match="--keep 5: cannot keep more"):
        distill_data(str(tiny_dir), out, env="arithmetic", env_args=[], prompts=1, samples=4, keep=5,
                     temperature=1.0, max_new_tokens=4, seed=0, chat_template=None, console=Console(quiet=True))
    assert math.isfinite(meta["solve_rate"])


def test_opd_trains_lora_adapters_of_the_student(tmp_path, teacher_dir):
    cfg = config(tmp_path, "opd-lora", teacher_dir, preset="opd", steps=2, lr=1e-2)
    cfg = validate({**cfg.model_dump(mode="json"), "model": {"path": "tiny-test", "lora": {"r": 4}}}, "test")
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "distill/reverse_kl" in r]
    assert len(train) == 2 and train[0]["distill/reverse_kl"] > 0.1  # the teacher is another model
    assert (cfg.run_dir / "final" / "adapter" / "adapter_config.json").is_file()
    assert (cfg.run_dir / "final" / "config.json").is_file()


def offline_config(tmp_path, name, teacher, data, **stage):
    return validate({
        "recipe": "opd_offline", "name": name, "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": "tiny-test"}, "env": {"name": "arithmetic", "args": {"digits": 1}},
        "teacher": {"path": str(teacher)},
        "opd_offline": {"data_path": str(data), "steps": 12, "batch_size": 16, "lr": 1e-2, **stage},
        "eval": {"problems": 2, "samples": 1, "ks": [1], "max_new_tokens": 2, "at_start": False},
    }, "test")


def test_offline_opd_caches_the_teacher_once_and_refuses_a_stale_cache(tmp_path, tiny_dir, teacher_dir):
    from rich.console import Console

    from posttrain.commands.distill_data import distill_data

    data = tmp_path / "student-samples.jsonl"
    meta = distill_data(str(tiny_dir), data, env="arithmetic", env_args=["digits=1"], prompts=16, samples=2, keep=2,
                        temperature=1.0, max_new_tokens=6, seed=0, chat_template=None, console=Console(quiet=True),
                        keep_failed=True)
    assert meta["rows"] >= 16 and meta["keep_failed"]  # the random student solves ~nothing: all kept anyway
    cache = tmp_path / "cache.pt"
    cfg = offline_config(tmp_path, "offline", teacher_dir, data, cache_path=str(cache))
    run(cfg)
    train = [r for r in rows(cfg.run_dir) if "distill/k2" in r]
    assert len(train) == 12 and train[-1]["distill/k2"] < 0.5 * train[0]["distill/k2"]
    last = rows(cfg.run_dir)[-1]
    assert last["compute/teacher_flops"] > 0 and "compute/generate_flops" not in last  # one teacher pass, no sampling
    assert "computed" in (cfg.run_dir / "run.log").read_text() and cache.is_file()
    # a second run reuses the cache (and counts its FLOPs: the work was done for these samples)
    again = offline_config(tmp_path, "offline-again", teacher_dir, data, cache_path=str(cache), steps=1)
    run(again)
    assert "read" in (again.run_dir / "run.log").read_text()
    assert rows(again.run_dir)[-1]["compute/teacher_flops"] == pytest.approx(last["compute/teacher_flops"])
    # another teacher, or samples that changed, or a tampered cache: refused, naming what differs
    with pytest.raises(UserError, match=r"cache\.pt: this teacher cache was computed from something else "
                                        r"\(teacher_weights"):
        run(offline_config(tmp_path, "other-teacher", tiny_dir, data, cache_path=str(cache), steps=1))
    stored = torch.load(cache, weights_only=True)
    stored["logprobs"][0] = stored["logprobs"][0] + 0.1
    torch.save(stored, cache)
    with pytest.raises(UserError, match=r"row 0 of the cache differs from the teacher by 0\.1"):
        run(offline_config(tmp_path, "tampered", teacher_dir, data, cache_path=str(cache), steps=1))
    with pytest.raises(UserError, match=r"opd_offline\.data_path: needs a teacher"):
        validate({"recipe": "opd_offline", "name": "x", "opd_offline": {"data_path": str(data)}}, "test")
