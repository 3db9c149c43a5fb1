"""A lean single-token decode step for Llama-family decoders (Llama, Qwen2), with a preallocated KV cache.

Why: on a CPU, generation with tiny models is bound by per-token overhead, not arithmetic. Profiling the generic
HF path (tiny-25m, batch 128) showed ~45% of decode time in `torch.cat` growing the DynamicCache every token
(O(T^2) copying) and ~10% in mask construction and cache bookkeeping. Here the cache is written in place into
buffers sized for the whole generation, and each layer runs the model's own modules (norms, projections, rotary
embedding, MLP) in the same order as the HF forward, so the numbers are the same up to float rounding
(tests/rollout/test_engine.py checks the logprobs against a teacher-forced forward).

Only for architectures whose layer structure is exactly Llama's; anything else uses the generic path in hf.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def supports(model: PreTrainedModel) -> bool:
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES or getattr(cfg, "use_sliding_window", False):
        return False
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model.model, "rotary_emb"):
        return False
    mlp_parts = ("gate_proj", "up_proj", "down_proj", "act_fn")
    if not all(all(hasattr(layer.mlp, p) for p in mlp_parts) for layer in layers):
        return False
    return all(abs(layer.self_attn.scaling - layer.self_attn.head_dim ** -0.5) < 1e-12 for layer in layers)


class KVBuffers:
    """Per-layer buffers filled left to right: keys transposed (N, kv_heads, head_dim, capacity) and values
    (N, kv_heads, capacity, head_dim), so that both attention matmuls read a prefix slice in place (a BLAS
    leading-dimension stride) instead of copying the cache every token."""

    def __init__(self, model: PreTrainedModel, cache: DynamicCache, rows: Tensor, capacity: int,
                 dtype: torch.dtype):
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        for layer in cache.layers:
            keys, values = layer.keys[rows], layer.values[rows]  # (N, kv_heads, P, head_dim)
            n, heads, width, dim = keys.shape
            k = keys.new_empty((n, heads, dim, capacity), dtype=dtype)
            v = values.new_empty((n, heads, capacity, dim), dtype=dtype)
            k[..., :width] = keys.transpose(-1, -2)
            v[:, :, :width] = values
            self.k.append(k)
            self.v.append(v)

        # q/k/v and gate/up as one matmul each, concatenated once per generation: a decode step's matmuls have only
        # batch-many rows, and one wider matmul keeps both cores busier than three narrow ones.
        layers = model.model.layers
        self.qkv = [fuse(dtype, layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
                    for layer in layers]
        self.gate_up = [fuse(dtype, layer.mlp.gate_proj, layer.mlp.up_proj) for layer in layers]
        fused: set[int] = set()  # Linears that run inside a fused matmul: no cast of their own is needed
        for layer, qkv, gate_up in zip(layers, self.qkv, self.gate_up, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            if qkv is not None:
                fused |= {id(attn.q_proj), id(attn.k_proj), id(attn.v_proj)}
            if gate_up is not None:
                fused |= {id(mlp.gate_proj), id(mlp.up_proj)}
        self.weights: dict[int, tuple[Tensor, Tensor | None]] = {}
        if dtype == torch.bfloat16:
            # What autocast would do to every other Linear on every call, done once for the whole generation.
            for m in model.modules():
                if not isinstance(m, torch.nn.Linear) or id(m) in fused:
                    continue
                self.weights[id(m)] = (m.weight.to(dtype), None if m.bias is None else m.bias.to(dtype))

    def linear(self, module: torch.nn.Linear, x: Tensor) -> Tensor:
        cast = self.weights.get(id(module))
        if cast is None:
            return module(x)
        weight, bias = cast
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias)

    def fused(self, parts: tuple[Tensor, Tensor | None] | None, modules: tuple[torch.nn.Linear, ...], x: Tensor
              ) -> tuple[Tensor, ...]:
        """The outputs of `modules` on x: one matmul when they were fused, else one each."""
        if parts is None:
            return tuple(self.linear(m, x) for m in modules)
        weight, bias = parts
        out = torch.nn.functional.linear(x.to(weight.dtype), weight, bias)
        return tuple(out.split([m.out_features for m in modules], dim=-1))

    def select(self, keep: Tensor) -> None:
        self.k = [k[keep] for k in self.k]
        self.v = [v[keep] for v in self.v]


def fuse(dtype: torch.dtype, *modules: torch.nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """The rows of several plain Linears on the same input, stacked (weights and biases) in `dtype`; None when any
    is not a plain nn.Linear (a LoRA-wrapped projection must run its adapter)."""
    if any(type(m) is not torch.nn.Linear for m in modules):
        return None
    weight = torch.cat([m.weight for m in modules]).to(dtype)
    if all(m.bias is None for m in modules):
        return weight, None
    bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules])
    return weight, bias.to(dtype)


def attend(q: Tensor, keys_t: Tensor, values: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Attention of one query per row: q (N, H, 1, hd), keys_t (N, KV, hd, T), values (N, KV, T, hd),
    mask (N, 1, 1, T) bool.

    Two small batched matmuls; for a single query over a short context they are several times faster on CPU than
    the flash-attention kernel, which is built for long query blocks. Grouped-query heads share their KV head
    through a reshape, without copying keys."""
    n, heads, _, dim = q.shape
    groups = heads // keys_t.shape[1]
    q = q.reshape(n, keys_t.shape[1], groups, dim)  # (N, KV, G, hd)
    scores = torch.matmul(q, keys_t).float() * scale  # (N, KV, G, T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(n, heads, 1, dim)  # (N, H, 1, hd)


def decode_step(model: PreTrainedModel, buffers: KVBuffers, tokens: Tensor, positions: Tensor, mask: Tensor,
                column: int) -> Tensor:
    """Feed one token per row; write its keys/values at `column`; attend over columns [0, column].

    tokens (N,), positions (N,), mask (N, >= column + 1) bool (False on left padding) -> logits (N, V)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # lazy, as in train/forward.py

    inner, lin = model.model, buffers.linear
    n = tokens.shape[0]
    x = inner.embed_tokens(tokens[:, None])  # (N, 1, d)
    cos, sin = inner.rotary_emb(x, positions[:, None])
    attn_mask = mask[:, None, None, : column + 1]  # (N, 1, 1, T)
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = buffers.fused(buffers.qkv[i], (attn.q_proj, attn.k_proj, attn.v_proj), h)
        q = q.reshape(n, 1, -1, attn.head_dim).transpose(1, 2)  # (N, H, 1, hd)
        k = k.reshape(n, 1, -1, attn.head_dim).transpose(1, 2)  # (N, KV, 1, hd)
        v = v.reshape(n, 1, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        buffers.k[i][..., column] = k[:, :, 0]
        buffers.v[i][:, :, column] = v[:, :, 0]
        keys_t, values = buffers.k[i][..., : column + 1], buffers.v[i][:, :, : column + 1]
        out = attend(q.to(values.dtype), keys_t, values, attn_mask, attn.scaling)
        x = x + lin(attn.o_proj, out.transpose(1, 2).reshape(n, 1, -1))
        h = layer.post_attention_layernorm(x)
        mlp = layer.mlp  # Llama/Qwen2 gated MLP: down(act(gate(h)) * up(h))
        gate, up = buffers.fused(buffers.gate_up[i], (mlp.gate_proj, mlp.up_proj), h)
        x = x + lin(mlp.down_proj, mlp.act_fn(gate) * up)
    return lin(model.lm_head, inner.norm(x))[:, -1]
