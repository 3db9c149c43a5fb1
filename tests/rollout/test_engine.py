"""The local rollout engine: exact logprobs, stopping, seeding, sampling filters."""

import torch

from posttrain.data.prompts import render_prompt
from posttrain.records import SamplingParams
from posttrain.rollout.local import LocalEngine
from posttrain.rollout.sampling import sample_next
from posttrain.train.forward import completion_logprobs, pack

# fp32 on CPU: the batched, left-padded, KV-cached decode and a single unpadded forward agree to float rounding.
LOGPROB_TOL = 1e-4


def prompts_for(tok, questions):
    return [render_prompt(tok, [{"role": "user", "content": q}]) for q in questions]


def test_engine_logprobs_match_a_teacher_forced_forward(tiny):
    model, tok = tiny
    engine = LocalEngine(model, tok)
    prompts = prompts_for(tok, ["1+2=", "123+456=", "9="]) * 3
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, seed=0))
    assert len(outs) == len(prompts)
    for c in outs:  # each sequence alone, no padding, no cache
        ids = torch.tensor([list(c.prompt_ids) + list(c.token_ids)])
        logp = model(ids).logits[0, len(c.prompt_ids) - 1: -1].float().log_softmax(-1)
        ref = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=LOGPROB_TOL, rtol=0)
    # and the learner's batched path (train/forward.py) agrees too
    batch = pack([c.prompt_ids for c in outs], [c.token_ids for c in outs], tok.pad_token_id)
    lp, _ = completion_logprobs(model, batch)
    for i, c in enumerate(outs):
        torch.testing.assert_close(lp[i, : len(c.token_ids)], torch.tensor(c.logprobs), atol=LOGPROB_TOL, rtol=0)


def test_temperature_scaled_logprobs_match(tiny):
    model, tok = tiny
    outs = LocalEngine(model, tok).generate(prompts_for(tok, ["7+7="]) * 4,
                                         SamplingParams(temperature=0.7, max_new_tokens=6, seed=1))
    batch = pack([c.prompt_ids for c in outs], [c.token_ids for c in outs], tok.pad_token_id)
    lp, _ = completion_logprobs(model, batch, temperature=0.7)
    for i, c in enumerate(outs):
        torch.testing.assert_close(lp[i, : len(c.token_ids)], torch.tensor(c.logprobs), atol=LOGPROB_TOL, rtol=0)


def test_same_seed_same_samples_and_different_seed_differs(tiny):
    model, tok = tiny
    engine = LocalEngine(model, tok)
    prompts = prompts_for(tok, ["1+1="]) * 8
    a = engine.generate(prompts, SamplingParams(max_new_tokens=10, seed=5))
    b = engine.generate(prompts, SamplingParams(max_new_tokens=10, seed=5))
    c = engine.generate(prompts, SamplingParams(max_new_tokens=10, seed=6))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_eos_stops_a_sequence_and_length_is_reported(tiny):
    model, tok = tiny
    # Make EOS overwhelmingly likely after the prompt: bias the output layer toward it.
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 0  # tied: the embedding row too; fine for this test
        bias = torch.zeros(model.config.vocab_size)
    engine = LocalEngine(model, tok)
    outs = engine.generate(prompts_for(tok, ["1="]) * 4, SamplingParams(temperature=0.0, max_new_tokens=5))
    for c in outs:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == tok.eos_token_id and len(c.token_ids) <= 5
        else:
            assert len(c.token_ids) == 5 and tok.eos_token_id not in c.token_ids
    del bias


def test_ignore_eos_generates_exactly_max_new_tokens_through_a_stop_token(tiny):
    model, tok = tiny
    engine = LocalEngine(model, tok)
    prompts, greedy = prompts_for(tok, ["1=", "22="]), SamplingParams(temperature=0.0, max_new_tokens=5)
    first = {c.token_ids[0] for c in engine.generate(prompts, greedy)}
    engine.eos_ids = torch.tensor(sorted(first))  # the token greedy decoding emits first now ends a completion
    assert [len(c.token_ids) for c in engine.generate(prompts, greedy)] == [1, 1]
    ignoring = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True))
    assert [(len(c.token_ids), c.finish_reason) for c in ignoring] == [(5, "length")] * 2


def test_greedy_equals_top_k_1_and_eos_finishes_early():
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 0.0, 0.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    greedy, lp = sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, generator=g)
    assert greedy.tolist() == [1, 0]
    torch.testing.assert_close(lp, logits.log_softmax(-1).gather(-1, greedy[:, None]).squeeze(-1))
    for _ in range(20):
        tk, _ = sample_next(logits, temperature=1.0, top_k=1, top_p=1.0, generator=g)
        assert tk.tolist() == [1, 0]


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps {0, 1}; top_p 0.5 keeps {0} only
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, temperature=1.0, top_k=0, top_p=0.6, generator=g)[0]) for _ in range(200)}
    assert seen == {0, 1}
    seen = {int(sample_next(logits, temperature=1.0, top_k=0, top_p=0.5, generator=g)[0]) for _ in range(50)}
    assert seen == {0}


def test_stop_strings_end_generation_and_are_cut_from_text(tiny):
    model, tok = tiny
    engine = LocalEngine(model, tok)
    outs = engine.generate(prompts_for(tok, ["go"]) * 6, SamplingParams(temperature=1.0, max_new_tokens=30,
                                                                          seed=3, stop=("a", "1")))
    for c in outs:
        full = tok.decode(list(c.token_ids), skip_special_tokens=True)
        if c.finish_reason == "stop" and c.token_ids[-1] != tok.eos_token_id:
            assert full[-1] in "a1" and "a" not in c.text and "1" not in c.text


def test_lean_llama_decode_matches_the_generic_hf_path(tiny):
    model, tok = tiny
    from posttrain.rollout import llama_decode

    assert llama_decode.supports(model)
    prompts = prompts_for(tok, ["1+2=", "123+456=", "77*3="]) * 5
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=11)
    lean = LocalEngine(model, tok, lean=True).generate(prompts, params)
    generic = LocalEngine(model, tok, lean=False).generate(prompts, params)
    assert [c.token_ids for c in lean] == [c.token_ids for c in generic]
    assert [c.finish_reason for c in lean] == [c.finish_reason for c in generic]
    for a, b in zip(lean, generic):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=LOGPROB_TOL, rtol=0)


# bf16 autocast changes the logits by bf16 rounding: on the tiny model the per-token logprob differs from fp32 by
# at most ~0.05 nats; the tolerance is documented in docs/performance.md.
BF16_LOGPROB_TOL = 0.1


def test_bf16_speedups_agree_with_the_fp32_path_within_tolerance(tiny):
    model, tok = tiny
    prompts = prompts_for(tok, ["12+34=", "5+6=", "99*9="]) * 4
    outs = LocalEngine(model, tok).generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=10, seed=2))
    batch = pack([c.prompt_ids for c in outs], [c.token_ids for c in outs], tok.pad_token_id)
    lp32, _ = completion_logprobs(model, batch)
    lp16, _ = completion_logprobs(model, batch, bf16=True)
    diff = ((lp32 - lp16).abs() * batch.mask).max()
    assert 0 < diff < BF16_LOGPROB_TOL
    # the bf16 engine's sampler logprobs against the bf16 learner (what the RL step compares)
    outs16 = LocalEngine(model, tok, bf16=True).generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=10,
                                                                              seed=2))
    batch16 = pack([c.prompt_ids for c in outs16], [c.token_ids for c in outs16], tok.pad_token_id)
    learner16, _ = completion_logprobs(model, batch16, bf16=True)
    for i, c in enumerate(outs16):
        torch.testing.assert_close(learner16[i, : len(c.token_ids)], torch.tensor(c.logprobs),
                                   atol=BF16_LOGPROB_TOL, rtol=0)
    # and a policy-gradient loss on those numbers: fp32 vs bf16 learner within the same order
    from posttrain.algos import POLICY_LOSSES, PolicyLossInputs

    adv = torch.randn(len(outs), 1).expand_as(batch.mask)
    loss32, _ = POLICY_LOSSES.get("ppo_clip")(PolicyLossInputs(lp32, lp32.detach(), adv, batch.mask))
    loss16, _ = POLICY_LOSSES.get("ppo_clip")(PolicyLossInputs(lp16, lp32.detach(), adv, batch.mask))
    scale = (loss32.abs() * batch.mask).sum()
    assert ((loss32 - loss16).abs() * batch.mask).sum() < 0.1 * scale


# ----- engines own their weights: the registry, copy mode and update_weights ------------------------------------


def test_a_copying_engine_goes_stale_without_sync_and_matches_the_learner_after_it(tiny):
    from posttrain.rollout import build_engine
    from posttrain.train.learner import Learner, Sequences
    from posttrain.train.losses import SFTLoss

    model, tok = tiny
    engine = build_engine("local", model, tok, weights="copy", version=0)
    learner = Learner(model, lr=5e-2, total_updates=3, micro_batch_size=8, pad_id=tok.pad_token_id)
    prompts = prompts_for(tok, ["1+2=", "34+5="]) * 3
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=4)
    for _ in range(3):  # move the policy well away from the engine's copy
        learner.train_step(Sequences(prompts, [[tok.convert_tokens_to_ids("7")] * 3] * len(prompts)), SFTLoss(18))

    def gap(outs):
        lp, _ = learner.logprobs(Sequences([c.prompt_ids for c in outs], [c.token_ids for c in outs]))
        return max(float((a - torch.tensor(c.logprobs)).abs().max()) for a, c in zip(lp, outs))

    stale = engine.generate(prompts, params)
    assert all(c.policy_version == 0 for c in stale)
    assert gap(stale) > 1e-2  # the engine still samples from the weights it was built with

    engine.update_weights(learner.weights(), version=3)
    fresh = engine.generate(prompts, params)
    assert all(c.policy_version == 3 for c in fresh)
    assert gap(fresh) < 1e-5  # fp32: after the sync its logprobs are the learner's
    assert engine.model is not model  # its own copy, not the learner's module


def test_a_shared_engine_samples_the_learner_module_and_records_versions(tiny):
    from posttrain.rollout import build_engine

    model, tok = tiny
    engine = build_engine("local", model, tok, weights="auto", version=5)
    assert engine.model is model
    outs = engine.generate(prompts_for(tok, ["1="]), SamplingParams(max_new_tokens=3))
    assert outs[0].policy_version == 5
    engine.update_weights({}, version=6)  # nothing to copy: it runs the learner's own parameters
    assert engine.generate(prompts_for(tok, ["1="]), SamplingParams(max_new_tokens=3))[0].policy_version == 6


def test_engine_registry_errors_name_the_key_and_the_missing_extra(tiny):
    import pytest

    from posttrain.errors import MissingExtraError, UserError
    from posttrain.rollout import ENGINES, build_engine
    from posttrain.rollout.base import lazy_builder

    model, tok = tiny
    with pytest.raises(UserError, match="rollout.engine: unknown rollout engine 'vlm'; known: local, vllm"):
        build_engine("vlm", model, tok)
    # a heavy backend is registered lazily: choosing it without its package names the pip install
    ENGINES._entries["fake-heavy"] = lazy_builder("some_heavy_pkg_xyz.engine:build", requires="some_heavy_pkg_xyz",
                                                   extra="heavy")
    try:
        with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[heavy\]'"):
            build_engine("fake-heavy", model, tok)
    finally:
        del ENGINES._entries["fake-heavy"]
