"""The learner's teacher-forced pass: shared prompt prefixes give the same logprobs and gradients as full copies."""

import pytest
import torch

from posttrain.models import load_model
from posttrain.train.forward import completion_logprobs, pack


def group_batch(seed: int = 0):
    """3 distinct prompts of different lengths x 4 completions of different lengths each (left/right padding)."""
    g = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for u in range(3):
        prompt = torch.randint(5, 90, (4 + 3 * u,), generator=g).tolist()
        for j in range(4):
            prompts.append(prompt)
            comps.append(torch.randint(5, 90, (1 + (u + 2 * j) % 7,), generator=g).tolist())
    return prompts, comps


def test_pack_keeps_each_distinct_prompt_once():
    prompts, comps = group_batch()
    shared = pack(prompts, comps, 0)
    assert shared.shares_prefixes and shared.prompt_ids.shape[0] == 3
    assert shared.prompt_rows.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert shared.prompt_mask.sum(-1).tolist() == [4, 7, 10]
    plain = pack(prompts, comps, 0, share_prefixes=False)
    assert not plain.shares_prefixes and plain.prompt_ids.shape[0] == 12
    assert torch.equal(plain.targets, shared.targets) and torch.equal(plain.mask, shared.mask)
    # distinct prompts only: nothing to share, the plain layout
    assert not pack([[1, 2], [3]], [[4], [5, 6]], 0).shares_prefixes


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_shared_prefixes_give_the_same_logprobs_and_gradients(tiny_dir, attention):
    model = load_model(tiny_dir, attention=attention)
    prompts, comps = group_batch()

    def loss_and_grads(share: bool):
        model.zero_grad(set_to_none=True)
        batch = pack(prompts, comps, 0, share_prefixes=share)
        lp, ent = completion_logprobs(model, batch, with_entropy=True)
        adv = torch.linspace(-1, 1, len(prompts))[:, None]
        loss = -((lp * adv + 0.1 * ent) * batch.mask).sum() / batch.mask.sum()
        loss.backward()
        return lp * batch.mask, ent * batch.mask, {n: p.grad.clone() for n, p in model.named_parameters()}

    lp_a, ent_a, grads_a = loss_and_grads(False)
    lp_b, ent_b, grads_b = loss_and_grads(True)
    torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_b, ent_a, atol=1e-5, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name, ga in grads_a.items():
        assert ga.abs().max() > 0, name  # every parameter takes part, through the prompt's keys/values too
        torch.testing.assert_close(grads_b[name], ga, atol=1e-6, rtol=1e-4, msg=name)


def test_shared_prefixes_in_bf16_stay_within_the_bf16_tolerance(tiny_dir):
    model = load_model(tiny_dir)
    prompts, comps = group_batch(1)
    plain = pack(prompts, comps, 0, share_prefixes=False)
    lp32, _ = completion_logprobs(model, plain)
    lp16, _ = completion_logprobs(model, pack(prompts, comps, 0), bf16=True)
    assert ((lp32 - lp16).abs() * plain.mask).max() < 0.1  # BF16_LOGPROB_TOL of tests/rollout/test_engine.py


@pytest.mark.parametrize("share", [False, True])
def test_chunked_head_gives_the_logits_paths_logprobs_and_gradients(tiny_dir, monkeypatch, share):
    """The large-vocabulary path (last hidden states through head_logprobs, real tokens only) against the
    model's own logits, forced on for the tiny model's vocabulary."""
    from posttrain.train import forward

    model = load_model(tiny_dir)
    prompts, comps = group_batch(2)
    batch = pack(prompts, comps, 0, share_prefixes=share)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        lp, ent = completion_logprobs(model, batch, temperature=0.7, with_entropy=True)
        adv = torch.linspace(-1, 1, len(prompts))[:, None]
        loss = -((lp * adv + 0.1 * ent) * batch.mask).sum() / batch.mask.sum()
        loss.backward()
        return lp * batch.mask, ent * batch.mask, {n: p.grad.clone() for n, p in model.named_parameters()}

    assert forward.chunked_head(model) is None  # 102 tokens: the plain path
    lp_a, ent_a, grads_a = loss_and_grads()
    monkeypatch.setattr(forward, "CHUNKED_HEAD_MIN_VOCAB", 1)
    assert forward.chunked_head(model) is model.get_output_embeddings().weight
    lp_b, ent_b, grads_b = loss_and_grads()
    torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_b, ent_a, atol=1e-5, rtol=0)
    for name, ga in grads_a.items():
        torch.testing.assert_close(grads_b[name], ga, atol=1e-6, rtol=1e-4, msg=name)


def test_chunked_head_is_not_used_where_the_head_is_not_a_plain_linear_map(tiny_dir, monkeypatch):
    from posttrain.train import forward

    monkeypatch.setattr(forward, "CHUNKED_HEAD_MIN_VOCAB", 1)
    model = load_model(tiny_dir)
    model.config.final_logit_softcapping = 30.0  # gemma-2 style: tanh applied after the head
    assert forward.chunked_head(model) is None
    model.config.final_logit_softcapping = None
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    assert forward.chunked_head(model) is None
