"""The local rollout engine: batched sampling with a KV cache, in-process, on a transformers model.

Weights. With `copy_weights=False` it samples from the learner's own module (nothing to sync: the laptop default).
With `copy_weights=True` it holds its own copy, as any out-of-process engine (vLLM, a Ray worker) does, and
samples from whatever weights it was last given by `update_weights`; every Completion records that version.

Exactness: the logprobs it reports are `log_softmax(logits / T)` of the same model on the same tokens with the
same left-padded layout the learner uses (train/forward.py), so in fp32 they match a teacher-forced forward pass
to ~1e-5 (tests/rollout/test_engine.py). With bf16 autocast they differ by bf16 rounding; use is_correction or
recompute_old_logprobs then.

Speed (the RL step is mostly generation on CPU):
- each distinct prompt is prefilled once and its KV cache repeated for its group (prefix sharing);
- finished sequences are dropped from the decode batch, so a batch costs what its live sequences cost;
- the loop stops as soon as every sequence has finished.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from posttrain.models.layout import autocast, cache_kwargs, distinct_prompts, left_pad
from posttrain.records import Completion, SamplingParams
from posttrain.rollout import llama_decode
from posttrain.rollout.merged_lora import MergedLora, mergeable
from posttrain.rollout.sampling import row_generators, sample_next

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase


class LocalEngine:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, bf16: bool = False,
                 lean: bool | None = None, copy_weights: bool = False, version: int = 0,
                 stop_ids: set[int] | None = None):
        """lean: use the preallocated-cache decode step of llama_decode.py (default: when the model supports it).
        copy_weights: hold a private copy of the weights, refreshed only by update_weights.
        stop_ids: the tokens that end a completion (data/prompts.py stop_token_ids); default EOS and the
        generation config's eos ids."""
        self.copy_weights = copy_weights
        self.model = copy.deepcopy(model).eval().requires_grad_(False) if copy_weights else model
        # A LoRA policy samples through a plain copy with the adapter folded in (rollout/merged_lora.py)
        self.merged = MergedLora(self.model) if mergeable(self.model) else None
        self.net = self.merged.model if self.merged is not None else self.model  # what the forward passes run
        self.lean = llama_decode.supports(self.net) if lean is None else lean
        self.tokenizer = tokenizer
        self.bf16 = bf16
        if stop_ids is None:
            from posttrain.data.prompts import stop_token_ids

            stop_ids = stop_token_ids(tokenizer, model.generation_config, chat_template=False)
        eos_ids = set(stop_ids)
        self.device = model.device
        self.eos_ids = torch.tensor(sorted(i for i in eos_ids if i is not None), dtype=torch.long,
                                    device=self.device)
        self.pad_id = tokenizer.pad_token_id
        self.version = version

    def update_weights(self, weights: Mapping[str, Tensor], version: int) -> None:
        """Copy in the tensors given (all weights, or the adapters of a LoRA policy: the base never changes;
        nothing to copy when sharing the learner's module) and record their version."""
        if self.copy_weights:
            own = self.model.state_dict()
            unknown = [k for k in weights if k not in own]
            if unknown:
                raise ValueError(f"update_weights: {len(unknown)} tensors this engine's model does not have, "
                                 f"e.g. {unknown[0]!r}")
            with torch.no_grad():
                for name, tensor in weights.items():
                    own[name].copy_(tensor)
        self.version = version

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        was_training = self.model.training
        self.model.eval()
        if self.merged is not None:
            self.merged.refresh()
        try:
            tokens, logprobs, lengths, finish = self._decode(prompts, params)
        finally:
            self.model.train(was_training)
        tokens, logprobs, lengths = tokens.cpu(), logprobs.cpu(), lengths.cpu()
        out = []
        for i, prompt in enumerate(prompts):
            n = int(lengths[i])
            ids = tokens[i, :n].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for s in params.stop:
                cut = text.find(s)
                if cut >= 0:
                    text = text[:cut]
            out.append(Completion(prompt_ids=tuple(prompt), token_ids=tuple(ids),
                                  logprobs=tuple(logprobs[i, :n].tolist()), finish_reason=finish[i], text=text,
                                  policy_version=self.version))
        return out

    def _prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[DynamicCache, Tensor, Tensor, Tensor, Tensor]:
        """Prefill each distinct prompt once. -> (cache of the distinct prompts, the distinct-prompt row of every
        prompt, last logits, attention mask and next position per prompt); callers repeat the cache rows."""
        distinct, rows = distinct_prompts(prompts)
        ids, mask = left_pad(distinct, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache  # lazy: see train/forward.py

        cache = DynamicCache()
        out = self.net(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(self.net, cache),
                       use_cache=True, logits_to_keep=1)
        rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        return cache, rows, out.logits[:, -1].float()[rows], mask[rows], pos[rows, -1] + 1

    def _decode(self, prompts, params: SamplingParams):
        # One autocast region for the whole call: autocast caches its bf16 copies of the weights until the region
        # exits, so they are cast once per call instead of once per token.
        with autocast(self.bf16, self.device):
            return self._decode_loop(prompts, params)

    def _decode_loop(self, prompts, params: SamplingParams):
        n = len(prompts)
        cache, prompt_rows, logits, mask, next_pos = self._prefill(prompts)
        width = mask.shape[1]
        if self.lean:  # preallocated cache; the mask gets its generated columns up front
            kv_dtype = torch.bfloat16 if self.bf16 else self.net.dtype
            buffers = llama_decode.KVBuffers(self.net, cache, prompt_rows, width + params.max_new_tokens, kv_dtype)
            mask = torch.cat([mask, mask.new_ones((n, params.max_new_tokens))], dim=1).bool()
            del cache
        else:
            cache.batch_select_indices(prompt_rows)
        dev = self.device
        generators = row_generators(params.seed, range(params.first_row, params.first_row + n), dev)
        tokens = torch.full((n, params.max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros((n, params.max_new_tokens), device=dev)
        lengths = torch.zeros(n, dtype=torch.long, device=dev)
        finish = ["length"] * n
        rows = torch.arange(n, device=dev)  # the full-batch row of each cache row
        active = torch.ones(n, dtype=torch.bool, device=dev)  # cache rows still generating
        for t in range(params.max_new_tokens):
            tok, lp = sample_next(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                  generator=[generators[r] for r in rows.tolist()])
            live = active.nonzero().squeeze(-1)
            tokens[rows[live], t] = tok[live]
            logprobs[rows[live], t] = lp[live]
            lengths[rows[live]] = t + 1
            done = (torch.zeros_like(active) if params.ignore_eos else torch.isin(tok, self.eos_ids)) & active
            if params.stop:
                done[live] |= self._hit_stop(tokens[rows[live], : t + 1], params.stop)
            for row in rows[done].tolist():
                finish[row] = "stop"
            active &= ~done
            alive = int(active.sum())
            if t + 1 == params.max_new_tokens or alive == 0:
                break
            # Finished rows ride along (their outputs are ignored) until a quarter of the batch is finished; then
            # the cache is compacted. Compacting copies the whole cache, so doing it on every finish costs more
            # than it saves.
            if len(rows) - alive >= max(1, len(rows) // 4):
                keep = active.nonzero().squeeze(-1)
                rows, active, tok, mask, next_pos = rows[keep], active[keep], tok[keep], mask[keep], next_pos[keep]
                if self.lean:
                    buffers.select(keep)
                else:
                    cache.batch_select_indices(keep)
            if self.lean:
                logits = llama_decode.decode_step(self.net, buffers, tok, next_pos, mask, width + t).float()
            else:
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                out = self.net(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                               **cache_kwargs(self.net, cache), use_cache=True)
                logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        return tokens, logprobs, lengths, finish

    def _hit_stop(self, generated: Tensor, stops: tuple[str, ...]) -> Tensor:
        texts = self.tokenizer.batch_decode(generated.tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in text for s in stops) for text in texts], dtype=torch.bool, device=self.device)
