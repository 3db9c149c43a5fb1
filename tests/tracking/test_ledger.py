"""The compute ledger against hand-computed numbers and against a direct count with torch's FlopCounterMode.

Both the ledger and FlopCounterMode count matrix multiplies only (elementwise ops, softmax, norms, rotary and the
embedding lookup are free in both), so on the dense attention paths they agree EXACTLY once the ledger is given
the context torch computes: the full T x T square (context = T), not the causal mean (T + 1) / 2 the ledger uses
for useful work. The one expected difference: torch's SDPA backward formula counts the flash-attention recompute
of the scores (2.5x the forward attention instead of 2x), so forward + backward through SDPA reads higher than the
ledger's model FLOPs; we require agreement within 5% there and check that the gap is exactly that recompute.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.tracking.ledger import FlopModel, causal, causal_context

aten = torch.ops.aten


def _cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, q, k, v)


# torch registers formulas for the CUDA SDPA kernels only; on CPU, SDPA runs this kernel, which we map to torch's
# own SDPA formulas so the count is still torch's.
CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}


def count(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        fn()
    return fc.get_total_flops()


def small_llama(attn: str, *, tied: bool = False) -> tuple[LlamaForCausalLM, FlopModel]:
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn)
    return model, FlopModel.from_config(model.config)


TOY = FlopModel(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10, tied=True)


def test_toy_config_hand_computed():
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; MLP 3*8*16 = 384  -> 576; 2 layers = 1152; head 8*10 = 80
    assert (TOY.n_layer, TOY.n_body, TOY.n_head, TOY.n_matmul) == (576, 1152, 80, 1232)
    # 3 tokens attending 2 positions: 2*1232*3 + 2*2*2 layers*2 ctx*8 attn_dim*3 tokens
    assert TOY.forward(3, 2) == 7392 + 384
    assert TOY.train(3, 2) == 3 * 7776
    assert TOY.forward(3, 2, logit_tokens=1) == 7776 - 2 * 80 * 2
    # decode(4, 3): prefill body 2*1152*4 + attention 4*2*8*(1+2+3+4) + head 2*80*1,
    # then 2 single-token steps attending 5 and 6 positions: 2*1232*2 + 4*2*8*(5+6)
    assert TOY.prefill(4) == 9216 + 640 + 160
    assert TOY.decode_steps(4, 3) == 4928 + 704
    assert TOY.decode(4, 3) == 15648
    assert TOY.decode(4, 1) == TOY.prefill(4) and TOY.decode(4, 0) == 0
    # logprob pass over 4 + 2 tokens with logits at the 2 completion positions: body + attention over 21 pairs
    assert TOY.logprob_pass(4, 2) == 2 * 1152 * 6 + 2 * 80 * 2 + 4 * 2 * 8 * 21


def test_causal_helpers_and_classic_wrappers():
    assert causal_context(4) == 2.5
    tokens, ctx = causal([4, 2])
    assert tokens == 6 and tokens * ctx == 10 + 3  # attended pairs
    # one pass over a sequence == prefill + decode, attention included (the KV cache changes nothing)
    P, n = 7, 5
    assert TOY.forward(*causal([P + n - 1]), logit_tokens=n) == pytest.approx(TOY.decode(P, n))


@pytest.mark.parametrize("tied", [True, False])
def test_from_config_counts_every_parameter(tied):
    model, fm = small_llama("eager", tied=tied)
    assert (fm.layers, fm.hidden, fm.heads, fm.kv_heads, fm.head_dim, fm.intermediate, fm.vocab, fm.tied) == \
        (2, 64, 4, 2, 16, 96, 50, tied)
    assert fm.n_params == sum(p.numel() for p in model.parameters())


def test_from_config_names_what_is_missing():
    class Gpt2Like:
        n_layer = 2

    with pytest.raises(ValueError, match="num_hidden_layers"):
        FlopModel.from_config(Gpt2Like())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("T", [8, 40])
def test_forward_matches_flop_counter_exactly(attn, T):
    model, fm = small_llama(attn)
    ids = torch.randint(0, 50, (2, T))
    measured = count(lambda: model(input_ids=ids))
    assert measured == pytest.approx(fm.forward(2 * T, context=T), rel=1e-12)  # dense square: context = T
    # the causal (useful-work) count is lower by exactly the masked half of the square
    masked = 4 * fm.layers * fm.attn_dim * 2 * (T * T - T * (T + 1) / 2)
    assert measured - fm.forward(*causal([T, T])) == pytest.approx(masked, rel=1e-12)


@pytest.mark.parametrize("T", [8, 40])
def test_forward_backward_matches_flop_counter(T):
    ids = torch.randint(0, 50, (2, T))
    eager, fm = small_llama("eager")
    measured = count(lambda: eager(input_ids=ids).logits.sum().backward())
    assert measured == pytest.approx(fm.train(2 * T, context=T), rel=1e-12)  # bmm attention: exactly 3x

    sdpa, _ = small_llama("sdpa")
    measured = count(lambda: sdpa(input_ids=ids).logits.sum().backward())
    predicted = fm.train(2 * T, context=T)
    assert predicted == pytest.approx(measured, rel=0.05)
    recompute = 0.5 * 4 * fm.layers * fm.attn_dim * T * 2 * T  # flash backward's extra QK^T: 0.5x fwd attention
    assert measured - predicted == pytest.approx(recompute, rel=1e-12)


def test_decode_and_logprob_pass_match_the_engine(tiny):
    from posttrain.records import SamplingParams
    from posttrain.rollout.local import LocalEngine
    from posttrain.train.forward import completion_logprobs, pack

    model, tok = tiny
    fm = FlopModel.from_model(model)
    assert fm.n_params == sum(p.numel() for p in model.parameters())
    engine = LocalEngine(model, tok)
    prompt = tok.encode("12+345=")
    P = len(prompt)
    out: list = []
    measured = count(lambda: out.extend(engine.generate([prompt], SamplingParams(max_new_tokens=6, seed=0))))
    n = len(out[0].token_ids)
    dense_prefill = 4 * fm.layers * fm.attn_dim * (P * P - P * (P + 1) / 2)  # SDPA prefill computes the square
    assert measured == pytest.approx(fm.decode(P, n) + dense_prefill, rel=1e-12)

    completion = [5, 6, 7]
    T = len(completion)
    with torch.no_grad():
        measured = count(lambda: completion_logprobs(model, pack([prompt], [completion], tok.pad_token_id)))
    dense = 4 * fm.layers * fm.attn_dim * ((P + T) ** 2 - (P + T) * (P + T + 1) / 2)
    extra_logit = 2 * fm.n_head  # train/forward.py keeps T + 1 logit positions and drops one
    assert measured == pytest.approx(fm.logprob_pass(P, T) + dense + extra_logit, rel=1e-12)


def test_shared_prefix_pass_matches_the_flop_counter(tiny):
    """Prompt once + completions on its keys/values (train/forward.py) = forward_shared_prefix, plus what a dense
    kernel adds: the masked half of the prompt's square and of each completion's own T x T block."""
    from posttrain.train.forward import completion_logprobs, pack

    model, tok = tiny
    fm = FlopModel.from_model(model)
    prompt = tok.encode("12+345=")
    P = len(prompt)
    completions = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    batch = pack([prompt] * 3, completions, tok.pad_token_id)
    assert batch.shares_prefixes and batch.targets.shape[1] == 5
    with torch.no_grad():
        measured = count(lambda: completion_logprobs(model, batch))
    W = 5  # completions are right-padded to the widest: the kernel works on 3 rows of W tokens each
    half = 4 * fm.layers * fm.attn_dim
    dense = half * (P * P - P * (P + 1) / 2) + 3 * half * (W * W - W * (W + 1) / 2)
    padded = fm.forward_shared_prefix(P, [W] * 3)
    extra_logits = 3 * 2 * fm.n_head  # logits at all W positions, the last one unused
    assert measured == pytest.approx(padded + dense + extra_logits, rel=1e-12)
    # one completion: the same count as the unshared pass
    assert fm.forward_shared_prefix(P, [4]) == pytest.approx(fm.logprob_pass(P, 4), rel=1e-12)
    assert fm.train_shared_prefix(P, [4, 2]) == pytest.approx(3 * fm.forward_shared_prefix(P, [4, 2]), rel=1e-12)
