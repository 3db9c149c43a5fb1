"""The pretrain stage: packing, the token budget, learning from random init, resume."""

import itertools
import json
import math
import re
import tomllib

import pytest
from resume_helpers import crash_after, metric_rows_without_time
from transformers import AutoModelForCausalLM

from posttrain.config import validate
from posttrain.data.corpus import file_documents, pack_tokens
from posttrain.errors import UserError
from posttrain.recipes.corpus import as_sequences
from posttrain.recipes.pretrain import PretrainConfig
from posttrain.runner import run


def test_packing_joins_documents_with_eos_and_cuts_full_sequences(tiny):
    _, tok = tiny
    docs = ["12+3=15", "7+1=8", "99+1=100"]
    ids = [tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id] for d in docs]
    stream = [t for doc in ids for t in doc]
    packed = list(pack_tokens(docs, tok, seq_len=6))
    assert packed == [stream[i: i + 6] for i in range(0, len(stream) - 5, 6)]  # the tail that is not full waits
    seqs = as_sequences(packed)
    assert seqs.prompts[0] == packed[0][:1] and seqs.completions[0] == packed[0][1:]


def test_the_budget_sets_the_steps():
    assert PretrainConfig(tokens=10_000, seq_len=50, batch_size=20).steps() == 10
    assert PretrainConfig(tokens=10, seq_len=50, batch_size=20).steps() == 1


def test_file_corpus_errors_name_the_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected a string 'text'"):
        file_documents(tmp_path / "bad.jsonl")
    (tmp_path / "one.txt").write_text("only one line\n")
    with pytest.raises(UserError, match="at least 2 documents"):
        file_documents(tmp_path / "one.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00a\nb\n")
    with pytest.raises(UserError, match="bin.txt:1: not UTF-8"):
        file_documents(tmp_path / "bin.txt")


def model_vocab(cfg) -> int:
    return AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").config.vocab_size


def pretrain_config(tmp_path, name="pt", **pt):
    return validate({
        "recipe": "pretrain", "name": name, "output_dir": str(tmp_path), "seed": 0, "threads": 2,
        "model": {"path": "tiny-test", "chat_template": False}, "env": {"name": "arithmetic", "args": {"digits": 1}},
        "pretrain": {"tokens": 24 * 32 * 8, "seq_len": 24, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-2,
                     "warmup_steps": 2, "eval_every": 8, "eval_sequences": 8, **pt},
        "eval": {"problems": 8, "samples": 2, "ks": [1, 2], "max_new_tokens": 3, "at_start": False},
        "checkpoint": {"every": 16, "keep_last_n": 3},
    }, "test")


def test_pretraining_from_random_init_lowers_the_held_out_loss_and_saves_a_loadable_model(tmp_path):
    cfg = pretrain_config(tmp_path)
    summary = run(cfg)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "pretrain/loss" in r]
    held = [r["pretrain/eval_loss"] for r in rows if "pretrain/eval_loss" in r]
    assert len(train) == 32 and summary["steps"] == 32
    # random init is ~ln(vocab) = 4.6 nats per token; by the first held-out point (step 8) the loss is far below that
    # and it keeps falling (this 0.1M-parameter model then plateaus near 2.4)
    assert held[-1] < held[0] < 0.65 * math.log(model_vocab(cfg))
    assert train[-1]["compute/pretrain_flops"] > 0 and train[-1]["train/tokens_total"] == 32 * 8 * 23
    model = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final")
    assert model.config.model_type == "llama"
    assert json.loads((cfg.run_dir / "eval" / "pretrain.json").read_text())["problems"] == 8


def test_pretraining_resumes_exactly(tmp_path):
    cfg = pretrain_config(tmp_path, tokens=24 * 8 * 6, eval_every=0)
    cfg = validate({**cfg.model_dump(mode="json"), "checkpoint": {"every": 2, "keep_last_n": 5}}, "test")
    run(cfg)
    reference = metric_rows_without_time(cfg.run_dir)
    final = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").state_dict()
    crash_after(cfg.run_dir, 2)
    run(cfg)  # from step_2
    assert metric_rows_without_time(cfg.run_dir) == reference
    resumed = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").state_dict()
    assert all((final[k] == resumed[k]).all() for k in final)


def test_the_environment_corpus_mixes_reasoning_traces_and_distractors_at_their_fractions():
    from posttrain.data.corpus import mixed_documents

    plain = (f"{i}+1={i + 1}" for i in range(10**6))
    traces = (f"{i}+1=\nworked\n{i + 1}" for i in range(10**6))
    docs = list(itertools.islice(mixed_documents(plain, traces, reasoning_fraction=0.3, distractor_fraction=0.2,
                                                 seed=0), 5000))
    worked = sum("worked" in d for d in docs) / len(docs)
    statements = [d for d in docs if "worked" not in d]
    shuffled = sum(not re.fullmatch(r"(\d+)\+1=(\d+)", d) for d in statements) / len(docs)
    assert abs(worked - 0.3) < 0.03 and abs(shuffled - 0.2) < 0.03  # 5000 draws: 4-5 standard errors
    again = list(itertools.islice(mixed_documents((f"{i}+1={i + 1}" for i in range(10**6)),
                                                  (f"{i}+1=\nworked\n{i + 1}" for i in range(10**6)),
                                                  reasoning_fraction=0.3, distractor_fraction=0.2, seed=0), 5000))
    assert again == docs  # seeded


def test_pretraining_on_a_mixed_corpus_runs_and_records_the_mix(tmp_path):
    cfg = pretrain_config(tmp_path, tokens=24 * 8 * 2, reasoning_fraction=0.5, eval_every=0)
    cfg = validate({**cfg.model_dump(mode="json"), "env": {"name": "arithmetic", "args": {"digits": 2}}}, "test")
    assert run(cfg)["steps"] == 2
    resolved = tomllib.loads((cfg.run_dir / "config.toml").read_text())["pretrain"]
    assert resolved["reasoning_fraction"] == 0.5 and resolved["reasoning_args"] == {"worked": True}
    with pytest.raises(UserError, match="with data_path the file is the corpus"):
        validate({**cfg.model_dump(mode="json"), "pretrain": {"data_path": "x.txt", "reasoning_fraction": 0.5}},
                 "test")
