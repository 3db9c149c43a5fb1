"""LoRA through PEFT ([model.lora]): the base stays bit-identical, every adapter tensor trains, merged and adapter
models agree, engines receive adapters only, the ledger counts what runs, and a LoRA run resumes crash-exactly."""

from __future__ import annotations

import signal

import pytest
import torch
from cli_runs import metrics, posttrain_run

from posttrain.config import LoraConfig
from posttrain.data.prompts import render_prompt
from posttrain.records import SamplingParams
from posttrain.train.forward import completion_logprobs, pack
from posttrain.train.learner import Learner, Sequences
from posttrain.train.losses import SFTLoss

pytest.importorskip("peft", reason="the lora extra is part of `make test`")

SEQS = Sequences([[5, 6, 7], [5, 6, 7], [9, 10]], [[11, 12], [13], [14, 15, 16]])


def lora_model(tiny_dir, attention: str | None = None, **kw):
    from posttrain.models import load_model
    from posttrain.models.lora import attach_lora

    torch.manual_seed(0)
    return attach_lora(load_model(tiny_dir, attention=attention), LoraConfig(**kw))


def trained(model, steps: int = 3) -> Learner:
    learner = Learner(model, lr=1e-2, total_updates=steps, micro_batch_size=8, pad_id=0)
    for _ in range(steps):
        assert learner.train_step(SEQS, SFTLoss(6)).skipped is None
    return learner


def test_training_moves_every_adapter_tensor_and_no_base_weight(tiny_dir):
    model = lora_model(tiny_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    # every Linear of the body is adapted ('all-linear'): 7 per layer, an A and a B each
    assert len(adapters) == 2 * 7 * model.config.num_hidden_layers
    learner = trained(model)
    optimised = {id(p) for group in learner.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for n, p in model.named_parameters() if n in adapters}  # only adapters optimised
    for name, p in model.named_parameters():
        if name in adapters:
            assert not torch.equal(before[name], p), f"adapter {name} did not change"
        else:
            assert torch.equal(before[name], p), f"base weight {name} changed"
    assert set(learner.weights()) == adapters  # what an engine is sent after an update


def test_merged_model_has_the_adapter_models_logprobs(tiny_dir):
    from posttrain.models.lora import merged_copy

    model = lora_model(tiny_dir, r=4, alpha=8.0)
    trained(model)
    merged = merged_copy(model)
    assert not hasattr(merged, "peft_config") and type(merged).__name__ == "LlamaForCausalLM"
    batch = pack(SEQS.prompts, SEQS.completions, 0)
    with torch.no_grad():
        lp_adapter, _ = completion_logprobs(model.eval(), batch)
        lp_merged, _ = completion_logprobs(merged.eval(), batch)
    assert float((lp_adapter - lp_merged).abs().max()) < 1e-5
    with torch.no_grad(), model.disable_adapter():
        lp_base, _ = completion_logprobs(model, batch)
    assert float((lp_adapter - lp_base).abs().max()) > 1e-3  # the adapter did change the model: not a vacuous match


def test_a_copying_engine_is_synced_with_adapter_tensors_only(tiny_dir):
    from posttrain.models import load_tokenizer
    from posttrain.rollout import build_engine

    tok = load_tokenizer(tiny_dir)
    model = lora_model(tiny_dir)
    engine = build_engine("local", model, tok, weights="copy", version=0)
    learner = trained(model)
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ["1+2=", "34+5="]] * 2
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=1)

    def gap(outs):
        lp, _ = learner.logprobs(Sequences([c.prompt_ids for c in outs], [c.token_ids for c in outs]))
        return max(float((a - torch.tensor(c.logprobs)).abs().max()) for a, c in zip(lp, outs, strict=True))

    assert gap(engine.generate(prompts, params)) > 1e-3  # stale: still the untrained adapter
    sent = learner.weights()
    assert all(".lora_" in name for name in sent)  # adapters, not the base
    assert sum(t.numel() for t in sent.values()) < sum(t.numel() for t in model.state_dict().values()) / 5
    engine.update_weights(sent, version=3)
    fresh = engine.generate(prompts, params)
    assert all(c.policy_version == 3 for c in fresh) and gap(fresh) < 1e-5
    with pytest.raises(ValueError, match="does not have"):
        engine.update_weights({"not.a.weight": torch.zeros(1)}, version=4)


def test_the_ledger_counts_adapters_and_no_base_weight_gradients(tiny_dir):
    """Against torch's FlopCounterMode on the eager path (context = T, see test_ledger.py). The one difference is the
    documented one: layer 0's q/k/v read the embedding output, which needs no gradient, so torch skips their input
    gradients (base and lora_A) and the ledger does not model that saving."""
    from torch.utils.flop_counter import FlopCounterMode

    from posttrain.tracking.ledger import FlopModel

    model = lora_model(tiny_dir, attention="eager", r=4)  # eager: the attention matmuls are counted by torch
    fm = FlopModel.from_model(model)
    plain = FlopModel.from_config(model.config)
    assert fm.frozen_base and fm.adapter == sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = 7
    ids = torch.randint(3, 20, (1, tokens))
    with FlopCounterMode(display=False) as fc:
        model(input_ids=ids).logits.float().sum().backward()
    attn = model.get_base_model().model.layers[0].self_attn
    qkv = [getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")]
    skipped = 2 * tokens * sum(m.base_layer.weight.numel() + m.lora_A["default"].weight.numel() for m in qkv)
    assert fm.train(tokens, tokens) - skipped == fc.get_total_flops()
    assert fm.train(tokens, tokens) < plain.train(tokens, tokens)  # no base weight gradients
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(input_ids=ids)
    assert fm.forward(tokens, tokens) == fc.get_total_flops()


def test_target_module_errors_name_the_key(tiny_dir):
    from posttrain.errors import UserError

    with pytest.raises(UserError, match="model.lora.target_modules"):
        lora_model(tiny_dir, target_modules=["no_such_proj"])


# ----- a LoRA run end to end: checkpoints hold the adapter, final/ the merged model, resume is crash-exact -----

RECIPE = """
recipe = ["sft", "rl"]
name = "lora"
seed = 2
threads = 1
[model]
path = "tiny-test"
[model.lora]
r = 4
alpha = 8
[env]
name = "arithmetic"
args = {digits = 1}
[sft]
steps = 3
batch_size = 8
lr = 1e-2
[rl]
steps = 3
prompts_per_step = 4
group_size = 4
max_new_tokens = 4
kl_coef = 0.05
lr = 1e-2
[eval]
problems = 4
samples = 2
ks = [1, 2]
max_new_tokens = 4
[checkpoint]
every = 2
"""


@pytest.mark.slow
def test_a_lora_run_resumes_crash_exactly_and_saves_adapter_and_merged_model(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "lora.toml"
    recipe.write_text(RECIPE)
    done = posttrain_run(recipe, tmp_path / "reference")
    assert done.returncode == 0, done.stderr
    ref = tmp_path / "reference" / "lora"
    assert "trainable of" in (ref / "run.log").read_text()
    for ckpt in (ref / "checkpoints").glob("step_*"):  # the adapter and the tokenizer, not the base weights
        assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert (ref / "final" / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(ref / "final")  # a plain model, as every posttrain command expects
    assert not hasattr(merged, "peft_config")

    crashed = posttrain_run(recipe, tmp_path / "crashed", fault="train:5")  # RL step 2, after the step-4 checkpoint
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    resumed = posttrain_run(recipe, tmp_path / "crashed")
    assert resumed.returncode == 0, resumed.stderr
    run_dir = tmp_path / "crashed" / "lora"
    assert "resuming" in resumed.stderr
    assert metrics(run_dir) == metrics(ref)
    for name in ("final/model.safetensors", "final/adapter/adapter_model.safetensors"):
        expected, got = load_file(ref / name), load_file(run_dir / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
