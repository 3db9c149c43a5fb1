"""Rollout workers as Ray actors: `[distributed] backend = "ray"`.

    [distributed]
    backend = "ray"
    num_rollout_workers = 2      # each actor owns an engine of kind rollout.engine (local or vllm)
    address = "auto"             # join the cluster `ray start --head` started; absent: Ray starts in-process

RayEngine is a RolloutEngine (rollout/base.py), so the RL step does not know it exists. A call to generate splits
the prompts between the actors by whole groups (a group's prompt is prefilled once, on one actor), with each
chunk's batch rows (SamplingParams.first_row), so every sample draws the random numbers it would in one engine.
update_weights puts the weights into the object store once per version; each actor fetches them from there.

Faults: an actor that dies (killed, out of memory, its node lost) is restarted from the latest weights and its
chunk re-issued; its results replace nothing and nothing is counted twice, because chunks are assembled by
position. After `max_restarts` restarts the run stops with the cause.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from torch import Tensor

from posttrain.config import DistributedConfig
from posttrain.errors import UserError
from posttrain.records import Completion, SamplingParams


class RolloutWorker:
    """One actor: a copy of the policy and an engine on it."""

    def __init__(self, spec: dict[str, Any], weights: Mapping[str, Tensor], version: int):
        torch.set_num_threads(spec["threads"])
        from transformers import AutoConfig, AutoModelForCausalLM

        from posttrain.rollout.base import build_engine

        config = AutoConfig.for_model(**spec["config"])
        model = AutoModelForCausalLM.from_config(config, torch_dtype=spec["dtype"],
                                                 attn_implementation=spec["attention"])
        model.load_state_dict(weights)
        self.engine = build_engine(spec["engine"], model.eval(), spec["tokenizer"], weights="copy", bf16=spec["bf16"],
                                   version=version, stop_ids=spec["stop_ids"], engine_args=spec["engine_args"])

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        return self.engine.generate(prompts, params)

    def update_weights(self, weights: Mapping[str, Tensor], version: int) -> int:
        self.engine.update_weights(weights, version)
        return version

    def pid(self) -> int:
        return os.getpid()


def start_ray(cfg: DistributedConfig) -> bool:
    """Join a cluster (address) or start Ray in this process. -> whether this call started it."""
    if ray.is_initialized():
        return False
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return True


def group_chunks(prompts: Sequence[Sequence[int]], parts: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of at most `parts` chunks, cut only where the prompt changes (between groups),
    each holding about the same number of rows."""
    starts = [i for i in range(len(prompts)) if i == 0 or prompts[i] != prompts[i - 1]]
    bounds, target = [0], len(prompts) / max(1, parts)
    for s in starts[1:]:
        if len(bounds) < parts and s >= target * len(bounds):
            bounds.append(s)
    bounds.append(len(prompts))
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


class RayEngine:
    def __init__(self, cfg: DistributedConfig, *, engine: str, engine_args: Mapping[str, Any], model: Any,
                 tokenizer: Any, bf16: bool, stop_ids: set[int], version: int,
                 on_note: Callable[[str], None] | None = None):
        if any(not p.requires_grad for p in model.parameters()):
            raise UserError("[distributed] backend = 'ray' with [model.lora] is not supported yet: the workers "
                            "would need the adapter layout; use backend = 'none'")
        self.cfg = cfg
        self.version = version
        self.restarts = 0
        self.on_note = on_note
        self._started = start_ray(cfg)
        need = cfg.num_rollout_workers * cfg.cpus_per_worker
        have = ray.cluster_resources().get("CPU", 0)
        if need > have:
            self.close()
            raise UserError(f"distributed.num_rollout_workers x cpus_per_worker = {need:g} CPUs, but the Ray "
                            f"cluster has {have:g}; lower them or raise distributed.num_cpus")
        self._spec = {"config": model.config.to_dict(), "dtype": model.dtype, "tokenizer": tokenizer,
                      "attention": model.config._attn_implementation, "engine": engine,
                      "engine_args": dict(engine_args), "bf16": bf16, "stop_ids": set(stop_ids),
                      "threads": cfg.worker_threads}
        self._weights = ray.put({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        self._actor = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)(RolloutWorker)
        self.workers = [self._spawn() for _ in range(cfg.num_rollout_workers)]
        ray.get([w.pid.remote() for w in self.workers])  # a worker that cannot start fails here, not mid-step

    def _spawn(self) -> Any:
        return self._actor.remote(self._spec, self._weights, self.version)

    def _restart(self, i: int, error: Exception) -> None:
        if self.restarts >= self.cfg.max_restarts:
            raise UserError(f"rollout worker {i} died ({type(error).__name__}) after "
                            f"distributed.max_restarts = {self.cfg.max_restarts} restarts: {str(error)[:300]}")
        self.restarts += 1
        with contextlib.suppress(Exception):  # already gone
            ray.kill(self.workers[i])
        self.workers[i] = self._spawn()
        if self.on_note is not None:
            self.on_note(f"rollout worker {i} died ({type(error).__name__}); restarted at policy version "
                         f"{self.version}, its prompts re-issued (restart {self.restarts} of "
                         f"{self.cfg.max_restarts})")

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        chunks = group_chunks(prompts, len(self.workers))

        def submit(j: int) -> Any:
            a, b = chunks[j]
            chunk_params = replace(params, first_row=params.first_row + a)
            return self.workers[j].generate.remote([list(p) for p in prompts[a:b]], chunk_params)

        pending = {submit(j): j for j in range(len(chunks))}
        results: list[list[Completion] | None] = [None] * len(chunks)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            j = pending.pop(done[0])
            try:
                results[j] = ray.get(done[0])
            except RayActorError as e:
                self._restart(j, e)
                pending[submit(j)] = j
        return [c for chunk in results for c in chunk]

    def update_weights(self, weights: Mapping[str, Tensor], version: int) -> None:
        self._weights = ray.put({k: v.detach().to("cpu", copy=True) for k, v in weights.items()})
        self.version = version
        pending = {w.update_weights.remote(self._weights, version): i for i, w in enumerate(self.workers)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                ray.get(done[0])
            except RayActorError as e:  # the new actor starts from self._weights: already at this version
                self._restart(i, e)
                pending[self.workers[i].pid.remote()] = i

    def worker_pids(self) -> list[int]:
        return ray.get([w.pid.remote() for w in self.workers])

    def close(self) -> None:
        for w in getattr(self, "workers", []):
            with contextlib.suppress(Exception):  # already gone
                ray.kill(w)
        self.workers = []
        if self._started and ray.is_initialized():
            ray.shutdown()
