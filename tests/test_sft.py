"""SFT: completion-only loss, micro-batch invariance, every parameter learns."""

import itertools

import pytest
import torch

from posttrain.data.sft import Example, collate, env_examples, micro_batches, read_jsonl_pairs
from posttrain.envs import make_env
from posttrain.errors import UserError
from posttrain.recipes.sft import sft_loss


def batch_of(tok, n=12):
    env = make_env("arithmetic", {"digits": [1, 3]})
    return list(itertools.islice(env_examples(env, tok, seed=0, chat_template=True, max_len=512), n))


def grads_for(model, examples, size, total):
    model.zero_grad()
    value = 0.0
    for mb in micro_batches(examples, size):
        loss = sft_loss(model, mb, total_tokens=total, pad_id=0, bf16=False)
        loss.backward()
        value += loss.item()
    return value, [p.grad.clone() for p in model.parameters()]


def test_loss_and_gradient_do_not_depend_on_the_micro_batch_split(tiny):
    model, tok = tiny
    examples = batch_of(tok)
    total = sum(len(e.completion) for e in examples)
    full, g_full = grads_for(model, examples, len(examples), total)
    for size in (1, 5):
        split, g_split = grads_for(model, examples, size, total)
        assert split == pytest.approx(full, rel=1e-5)
        for a, b in zip(g_full, g_split):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_loss_counts_only_completion_tokens(tiny):
    model, _tok = tiny
    ex = Example(prompt=[10, 11, 12, 13], completion=[20, 2])
    _ids, attn, loss_mask = collate([ex, Example([10], [21, 22, 2])], pad_id=0)
    assert loss_mask[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert loss_mask[1].tolist() == [0, 1, 1, 1, 0, 0]
    assert attn[1].tolist() == [1, 1, 1, 1, 0, 0]
    # changing a prompt-token's target can't change the loss, changing a completion token does
    base = sft_loss(model, [ex], total_tokens=2, pad_id=0, bf16=False).item()
    other_completion = sft_loss(model, [Example([10, 11, 12, 13], [30, 2])], total_tokens=2, pad_id=0,
                                bf16=False).item()
    assert base != other_completion


def test_one_step_changes_every_trainable_parameter(tiny):
    model, tok = tiny
    examples = batch_of(tok, 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = sft_loss(model, examples, total_tokens=sum(len(e.completion) for e in examples), pad_id=0, bf16=False)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())]
    assert unchanged == []


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n')
    with pytest.raises(UserError, match=r"d.jsonl:2"):
        read_jsonl_pairs(p)
    p.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        read_jsonl_pairs(p)
    with pytest.raises(UserError, match="not found"):
        read_jsonl_pairs(tmp_path / "missing.jsonl")
