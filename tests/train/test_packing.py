"""Packed SFT (train/forward.py pack_examples): examples laid end to end without padding give the unpacked pass's
logprobs, loss and gradients, in every attention implementation and through the chunked head."""

import copy

import pytest
import torch

from posttrain.models import load_model
from posttrain.train import forward
from posttrain.train.forward import completion_logprobs, pack, pack_examples, packed_completion_logprobs
from posttrain.train.learner import Learner, Sequences
from posttrain.train.losses import SFTLoss


def sft_batch(seed: int = 0, n: int = 9):
    """n examples with prompts of 1-9 tokens and completions of 0-6 (an empty one included)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 90, (1 + (3 * i) % 9,), generator=g).tolist() for i in range(n)]
    completions = [torch.randint(5, 90, ((5 * i) % 7,), generator=g).tolist() for i in range(n)]
    return prompts, completions


def test_examples_are_laid_first_fit_with_restarting_positions_by_hand():
    packs = pack_examples([[1, 2], [3], [4, 5, 6]], [[7], [8, 9], [10]], 0, row_tokens=6)
    assert packs.ids.tolist() == [[1, 2, 7, 3, 8, 9], [4, 5, 6, 10, 0, 0]]
    assert packs.positions.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]]
    # the output at position len(prompt) - 1 + j predicts completion token j; row 1 starts at flat index 6
    assert packs.predicts.tolist() == [[1, 0], [3, 4], [8, 0]]
    assert packs.targets.tolist() == [[7, 0], [8, 9], [10, 0]] and packs.mask.tolist() == [[1, 0], [1, 1], [1, 0]]
    # an example longer than a row gets one of its own; later examples still fill earlier rows
    long = pack_examples([[1] * 5, [2], [3]], [[4] * 3, [5], [6]], 0, row_tokens=4)
    assert long.ids.shape == (2, 8) and long.ids[1, :4].tolist() == [2, 5, 3, 6]
    with pytest.raises(ValueError, match="empty prompt"):
        pack_examples([[]], [[1]], 0, row_tokens=4)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("row_tokens", [8, 16, 64])
def test_packed_logprobs_and_gradients_equal_the_unpacked_ones(tiny_dir, attention, row_tokens):
    model = load_model(tiny_dir, attention=attention)
    prompts, completions = sft_batch()

    def loss_and_grads(packed: bool):
        model.zero_grad(set_to_none=True)
        if packed:
            batch = pack_examples(prompts, completions, 0, row_tokens)
            lp, ent = packed_completion_logprobs(model, batch, with_entropy=True)
        else:
            batch = pack(prompts, completions, 0)
            lp, ent = completion_logprobs(model, batch, with_entropy=True)
        loss = -((lp + 0.1 * ent) * batch.mask).sum() / batch.mask.sum()
        loss.backward()
        return loss.detach(), lp * batch.mask, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, lp_a, grads_a = loss_and_grads(False)
    loss_b, lp_b, grads_b = loss_and_grads(True)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=0)
    for name, ga in grads_a.items():
        torch.testing.assert_close(grads_b[name], ga, atol=1e-6, rtol=1e-4, msg=name)


def test_packed_logprobs_through_the_chunked_head_equal_the_logits_path(tiny_dir, monkeypatch):
    model = load_model(tiny_dir)
    prompts, completions = sft_batch(seed=1)
    batch = pack_examples(prompts, completions, 0, 16)
    lp_a, ent_a = packed_completion_logprobs(model, batch, with_entropy=True)
    monkeypatch.setattr(forward, "CHUNKED_HEAD_MIN_VOCAB", 1)
    assert forward.chunked_head(model) is not None
    lp_b, ent_b = packed_completion_logprobs(model, batch, with_entropy=True)
    torch.testing.assert_close(lp_b * batch.mask, lp_a * batch.mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_b * batch.mask, ent_a * batch.mask, atol=1e-5, rtol=0)


def test_a_packed_sft_step_is_the_unpacked_step(tiny_dir):
    """Learner.train_step with pack_tokens: the same loss (to 1e-6), tokens and gradient norm as without, over two
    micro-batches, and the same clipped gradient (read from AdamW's first moment, (1 - beta1) x gradient: the
    weights themselves are no test, as Adam's first step moves a weight by lr whatever its gradient's size, so a
    gradient of 1e-12 and one of -1e-12 land 2 lr apart)."""
    prompts, completions = sft_batch(seed=2, n=12)
    seqs = Sequences(prompts, completions)
    base = load_model(tiny_dir)

    def step(pack_tokens):
        model = copy.deepcopy(base)
        learner = Learner(model, lr=1e-3, total_updates=1, micro_batch_size=6, pad_id=0)
        result = learner.train_step(seqs, SFTLoss(sum(map(len, completions))), pack_tokens=pack_tokens)
        moments = {name: learner.optimizer.state[p]["exp_avg"] for name, p in model.named_parameters()}
        return result, moments

    plain, moments_a = step(None)
    packed, moments_b = step(24)
    assert abs(packed.loss - plain.loss) < 1e-6 and packed.tokens == plain.tokens == sum(map(len, completions))
    assert packed.flops > 0 and packed.skipped is None and abs(packed.grad_norm - plain.grad_norm) < 1e-5
    for name, m in moments_a.items():
        torch.testing.assert_close(moments_b[name], m, atol=1e-7, rtol=1e-4, msg=name)
