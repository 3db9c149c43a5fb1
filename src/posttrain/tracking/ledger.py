"""The compute ledger: FLOPs for every kind of work a run does (DESIGN.md, "Compute ledger").

    fm = FlopModel.from_config(model.config)
    fm.forward(tokens=512, context=256.5)          # a no-grad forward pass
    fm.train(*causal([40, 52, 37]))                # forward + backward over three causal sequences
    fm.decode(prompt_tokens=12, new_tokens=8)      # KV-cache generation of one completion
    fm.prefill(12) + sum(fm.decode_steps(12, n) for n in (8, 5, 8))   # a group sharing its prompt's prefill
    fm.logprob_pass(prompt_tokens=12, completion_tokens=8)             # old / ref / teacher logprobs

What is counted: MODEL FLOPs (the MFU convention, Kaplan et al. 2020 Table 1; Chinchilla, Hoffmann et al. 2022
App. F): every matrix multiply, at 2 FLOPs per multiply-add, and nothing else. Elementwise work (norms, softmax,
SiLU, rotary, residual adds) and the embedding lookup are free; they are O(d) per token against O(d^2) for a matmul.

Parameters in matrix multiplies (gated MLP: gate, up, down; grouped-query attention: kv_heads <= heads):

    N_layer  = d * (heads * hd)  +  2 * d * (kv_heads * hd)  +  (heads * hd) * d  +  3 * d * d_ff
               q                    k and v                     o                    MLP
    N_body   = layers * N_layer
    N_head   = d * vocab            (the LM head; counted even when tied to the embedding, which is free as a lookup)
    N_matmul = N_body + N_head

Forward pass over `tokens` tokens, each attending to `context` positions on average, with logits computed at
`logit_tokens` positions (default: all of them):

    forward = 2 * N_body * tokens  +  2 * N_head * logit_tokens  +  2 * 2 * layers * context * (heads * hd) * tokens
                                                                    QK^T scores and the weighted sum over V

    train   = 3 * forward           (backward = 2 x forward: gradients w.r.t. activations and w.r.t. weights)

Causal masking. A token at position i (1-based) of a causal sequence attends to i positions, so a whole sequence
of length T has mean context (T + 1) / 2 (`causal`). That is the useful work, the work a causal flash kernel
does, and the count that makes prefill + decode add up to the same attention as one pass over the sequence. A
dense kernel (eager attention, torch's CPU SDPA) computes the full T x T square and masks half of it; torch's
FlopCounterMode counts that full square (context = T). tests/tracking/test_ledger.py checks both: with context = T the
ledger equals FlopCounterMode's matmul count exactly.

Generation with a KV cache (rollout/local.py): one prefill over the P prompt tokens (causal, logits only at the last
position), then one single-token forward per further new token; the t-th of them (t = 1 .. n-1) attends P + t
positions. The last sampled token needs no forward pass.

    prefill(P)          = forward(P, (P + 1) / 2, logit_tokens=1)
    decode_steps(P, n)  = sum_{t=1}^{n-1} forward(1, P + t)
    decode(P, n)        = prefill(P) + decode_steps(P, n)            (0 when n = 0)

Logprob passes (train/forward.py) run over prompt + completion but keep logits only at the completion positions:

    logprob_pass(P, T)  = forward(P + T, (P + T + 1) / 2, logit_tokens=T)

The same shape with 3x is the RL training pass (`train(P + T, ..., logit_tokens=T)`). When G completions share
their prompt, the learner runs the prompt once and the completions on top of its keys/values:
    forward_shared_prefix(P, [T_1..T_G]) = forward(P, (P + 1) / 2, logit_tokens=1)
                                           + sum_g forward(T_g, P + (T_g + 1) / 2, logit_tokens=T_g - 1)
and 3x that for training (`train_shared_prefix`). With G = 1 both equal the unshared formulas.
LoRA (models/lora.py): the adapters add their own multiply-adds, `adapter` = sum of r x (in + out) over the
adapted Linears, to every forward token; with the base frozen, the backward computes activation gradients but no
base weight gradients, so training is 3x the forward minus one base-weight forward:
    train_lora = 3 * forward - 2 * (N_body * tokens + N_head * logit_tokens)
The first layers before any adapter need no activation gradient either (with every Linear adapted: layer 0's
q/k/v input gradients); that saving is not modelled (an overcount of under one layer's q/k/v).
Not modelled: mixture-of-experts routing, recomputation (activation checkpointing, flash-attention backward
recomputing the scores: torch's SDPA backward formula counts it, so it reads ~2.5x instead of 2x on the attention
term), padding (the ledger counts real tokens; a padded batch does more hardware work).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FORWARD = 2.0  # FLOPs per multiply-add
TRAIN_MULTIPLIER = 3.0  # forward + backward (2x forward)


@dataclass(frozen=True)
class FlopModel:
    """The shape of a decoder-only transformer, as far as FLOPs are concerned."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    mlp_matrices: int = 3  # gated MLP (Llama, Qwen2, Mistral); 2 for a plain up/down MLP
    adapter: int = 0  # LoRA multiply-adds per token (sum of r x (in + out) over the adapted Linears)
    frozen_base: bool = False  # base weights frozen (LoRA): no base weight gradients in training

    @classmethod
    def from_config(cls, config: Any) -> FlopModel:
        """From a transformers config with Llama-family attribute names (Llama, Qwen2, Mistral, ...)."""
        missing = [a for a in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                               "vocab_size") if getattr(config, a, None) is None]
        if missing:
            raise ValueError(f"{type(config).__name__}: cannot count FLOPs, missing {', '.join(missing)} "
                             "(only Llama-family configs are supported)")
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(layers=int(config.num_hidden_layers), hidden=int(config.hidden_size), heads=heads,
                   kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), head_dim=int(head_dim),
                   intermediate=int(config.intermediate_size), vocab=int(config.vocab_size),
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    @classmethod
    def from_model(cls, model: Any) -> FlopModel:
        """From a model: its config, plus its LoRA adapters (a PEFT model) when it has them."""
        base = cls.from_config(model.config)
        if not hasattr(model, "peft_config"):
            return base
        adapter = sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
        return dataclasses.replace(base, adapter=adapter, frozen_base=True)

    # -- parameter counts ---------------------------------------------------------------------------------------
    @property
    def attn_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def n_layer(self) -> int:
        d, kv = self.hidden, self.kv_heads * self.head_dim
        return d * self.attn_dim + 2 * d * kv + self.attn_dim * d + self.mlp_matrices * d * self.intermediate

    @property
    def n_body(self) -> int:
        return self.layers * self.n_layer

    @property
    def n_head(self) -> int:
        return self.hidden * self.vocab

    @property
    def n_matmul(self) -> int:
        return self.n_body + self.n_head

    @property
    def n_params(self) -> int:
        """All parameters of a bias-free Llama-style model: embedding, body, RMSNorm gains, head unless tied."""
        norms = (2 * self.layers + 1) * self.hidden
        return self.vocab * self.hidden + self.n_body + norms + (0 if self.tied else self.n_head)

    # -- FLOPs --------------------------------------------------------------------------------------------------
    def forward(self, tokens: float, context: float, *, logit_tokens: float | None = None) -> float:
        """A forward pass over `tokens` tokens attending to `context` positions on average; logits at
        `logit_tokens` positions (default: every token)."""
        logit_tokens = tokens if logit_tokens is None else logit_tokens
        attention = 2.0 * self.layers * context * self.attn_dim * tokens  # QK^T and the V sum, multiply-adds
        return FORWARD * ((self.n_body + self.adapter) * tokens + self.n_head * logit_tokens + attention)

    def base_weight_forward(self, tokens: float, logit_tokens: float) -> float:
        """The base-weight matmuls of a forward pass: what a frozen base does not repeat for weight gradients."""
        return FORWARD * (self.n_body * tokens + self.n_head * logit_tokens) if self.frozen_base else 0.0

    def train(self, tokens: float, context: float, *, logit_tokens: float | None = None) -> float:
        """Forward + backward (model FLOPs: no recomputation)."""
        logit_tokens = tokens if logit_tokens is None else logit_tokens
        return (TRAIN_MULTIPLIER * self.forward(tokens, context, logit_tokens=logit_tokens)
                - self.base_weight_forward(tokens, logit_tokens))

    def prefill(self, prompt_tokens: int) -> float:
        """Prefill of one prompt into the KV cache (causal, logits at the last position only)."""
        if prompt_tokens <= 0:
            return 0.0
        return self.forward(prompt_tokens, causal_context(prompt_tokens), logit_tokens=1)

    def decode_steps(self, prompt_tokens: int, new_tokens: int) -> float:
        """The single-token forwards after the prefill: n - 1 of them, the t-th attending prompt + t positions."""
        steps = max(0, new_tokens - 1)
        # sum_{t=1}^{steps} (P + t) = steps * P + steps * (steps + 1) / 2
        total_context = steps * prompt_tokens + steps * (steps + 1) / 2
        return self.forward(steps, total_context / steps if steps else 0.0)

    def decode(self, prompt_tokens: int, new_tokens: int) -> float:
        """Generating `new_tokens` tokens after a `prompt_tokens` prompt with a KV cache."""
        if new_tokens <= 0:
            return 0.0
        return self.prefill(prompt_tokens) + self.decode_steps(prompt_tokens, new_tokens)

    def logprob_pass(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Teacher-forced no-grad pass for the completion's logprobs (old / ref / teacher)."""
        length = prompt_tokens + completion_tokens
        return self.forward(length, causal_context(length), logit_tokens=completion_tokens)

    def forward_shared_prefix(self, prompt_tokens: int, completion_tokens: Iterable[int]) -> float:
        """Teacher-forced pass over one prompt and the completions that continue it, the prompt computed once
        (train/forward.py's shared prefixes): the prompt forward with one logit, then each completion's T tokens
        attending the prompt plus their causal part, with logits at T - 1 positions. For a single completion this
        equals logprob_pass(P, T)."""
        prompt = self.forward(prompt_tokens, causal_context(prompt_tokens), logit_tokens=1) if prompt_tokens else 0.0
        rest = sum(self.forward(t, prompt_tokens + causal_context(t), logit_tokens=t - 1) for t in completion_tokens if t)
        return prompt + rest

    def train_shared_prefix(self, prompt_tokens: int, completion_tokens: Iterable[int]) -> float:
        """Forward + backward of forward_shared_prefix (the RL training pass)."""
        completion_tokens = [t for t in completion_tokens if t]
        frozen = ((self.base_weight_forward(prompt_tokens, 1) if prompt_tokens else 0.0)
                  + sum(self.base_weight_forward(t, t - 1) for t in completion_tokens))
        return TRAIN_MULTIPLIER * self.forward_shared_prefix(prompt_tokens, completion_tokens) - frozen


def causal_context(length: int) -> float:
    """Mean number of positions a token attends to in a causal sequence of this length: (T + 1) / 2."""
    return (length + 1) / 2


def causal(lengths: Iterable[int]) -> tuple[int, float]:
    """(tokens, mean context) of a batch of causal sequences, for forward(*causal(lengths)).

    Exact, because the attention term is linear in tokens * context: sum_i T_i (T_i + 1) / 2 attended pairs."""
    lengths = list(lengths)
    tokens = sum(lengths)
    pairs = sum(t * (t + 1) / 2 for t in lengths)
    return tokens, (pairs / tokens if tokens else 0.0)
