"""A LoRA policy samples through a plain copy with its adapter folded in (rollout/merged_lora.py): the engine's
logprobs stay the learner's after every update, the learner's base weights are never touched, and what cannot be
folded exactly (DoRA, a second adapter, modules_to_save) samples through the adapter as before."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import LoraConfig
from posttrain.data.prompts import render_prompt
from posttrain.records import SamplingParams
from posttrain.rollout.merged_lora import mergeable
from posttrain.train.learner import Learner, Sequences
from posttrain.train.losses import SFTLoss

pytest.importorskip("peft", reason="the lora extra is part of `make test`")

SEQS = Sequences([[5, 6, 7], [9, 10]], [[11, 12], [14, 15, 16]])


def lora_model(tiny_dir, **kw):
    from posttrain.models import load_model
    from posttrain.models.lora import attach_lora

    torch.manual_seed(0)
    return attach_lora(load_model(tiny_dir), LoraConfig(**kw))


def test_only_a_plain_single_lora_adapter_is_folded(tiny_dir):
    import peft

    from posttrain.models import load_model

    assert mergeable(lora_model(tiny_dir))
    assert not mergeable(load_model(tiny_dir))
    dora = peft.get_peft_model(load_model(tiny_dir), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert not mergeable(dora)
    saved = peft.get_peft_model(load_model(tiny_dir), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                      modules_to_save=["lm_head"]))
    assert not mergeable(saved)


def test_a_shared_lora_engine_samples_the_current_adapter_without_touching_the_base(tiny_dir):
    from posttrain.models import load_tokenizer
    from posttrain.rollout import build_engine

    tok = load_tokenizer(tiny_dir)
    model = lora_model(tiny_dir, r=4, alpha=8.0)
    engine = build_engine("local", model, tok, version=0)  # weights = "auto": the learner's own module
    assert engine.merged is not None and not hasattr(engine.net, "peft_config") and engine.lean
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    learner = Learner(model, lr=1e-2, total_updates=3, micro_batch_size=8, pad_id=0)
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ["1+2=", "34+5="]] * 2
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=1)
    for _ in range(3):  # no update_weights: the engine sees the optimizer's in-place writes to the adapter
        assert learner.train_step(SEQS, SFTLoss(5)).skipped is None
        outs = engine.generate(prompts, params)
        lp, _ = learner.logprobs(Sequences([c.prompt_ids for c in outs], [c.token_ids for c in outs]))
        assert max(float((a - torch.tensor(c.logprobs)).abs().max()) for a, c in zip(lp, outs, strict=True)) < 1e-5
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in base.items())  # bit for bit: nothing merged in place
    with torch.no_grad(), model.disable_adapter():  # and the adapter did move: the match above is not vacuous
        plain_lp, _ = learner.logprobs(Sequences([c.prompt_ids for c in outs], [c.token_ids for c in outs]))
    assert max(float((a - b).abs().max()) for a, b in zip(lp, plain_lp, strict=True)) > 1e-3
