"""Sharded data parallelism with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`): N ranks each hold 1/N of
the parameters, gradients and optimizer state, and each runs its share of a step's micro-batches.

    dist.init_process_group("gloo")                      # "nccl" on GPUs; torchrun sets RANK / WORLD_SIZE
    model = shard(model)                                 # every decoder layer, then the root
    learner = Learner(model, ..., data_parallel=DataParallel.current())

Invariance. The loss functions divide by the step's GLOBAL normalisers (algos/aggregation.py), so the step's loss
is the sum of its micro-batch losses, whichever process runs each. The micro-batches are cut exactly as in one
process and dealt out round-robin; gradients are SUMMED across ranks (FSDP's divide factor set to 1, not its
default mean over ranks), so the update equals the single-process one up to float summation order. A rank with
fewer micro-batches than another runs a zero-weighted pass, because every forward and backward is a collective.

Checkpoints (`save_learner` / `load_learner`): torch.distributed.checkpoint writes each rank's shards of the
weights and the optimizer state with the metadata to re-cut them, so a learner saved by N ranks loads into M
(1 included, without any process group).

train/learner_group.py drives N such ranks (local processes or Ray actors) from the run's process behind the
Learner interface: `[learner] world_size = N` in a recipe.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from posttrain.errors import UserError
from posttrain.train.safe_load import dcp_load


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (model.model.layers), each its own FSDP unit."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"shard: {type(model).__name__} has no model.layers (a Hugging Face decoder's blocks)")
    return list(layers)


def shard(model: nn.Module, *, mesh=None, reshard_after_forward: bool = True, offload: bool = False) -> nn.Module:
    """Shard `model` in place over the default process group (or `mesh`): one FSDP unit per decoder layer, the
    rest (embeddings, final norm, LM head) in the root's, gradients summed across ranks. `offload`: keep the
    parameter shards, their gradients and so the optimizer state in CPU memory, copied to the device per unit
    (FSDP2's CPUOffloadPolicy; the optimizer step then runs on the CPU)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    return model


def is_sharded(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_part(tensor: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor; any other tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full(tensor: Tensor) -> Tensor:
    """A sharded tensor gathered whole on every rank (a collective); any other tensor as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks that share a step."""

    rank: int
    world_size: int

    @classmethod
    def current(cls) -> DataParallel:
        if not dist.is_initialized():
            raise RuntimeError("DataParallel.current(): torch.distributed is not initialised")
        return cls(dist.get_rank(), dist.get_world_size())

    def my_chunks(self, chunks: list[Tensor]) -> list[Tensor | None]:
        """This rank's micro-batches, round-robin, padded with None to the count every rank runs."""
        mine: list[Tensor | None] = list(chunks[self.rank::self.world_size])
        return mine + [None] * (math.ceil(len(chunks) / self.world_size) - len(mine))

    def sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0])

    def gather(self, values: list[Any]) -> list[Any]:
        """Every rank's `values` lists concatenated, in rank order, on every rank."""
        gathered: list[list[Any] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, values)
        return [v for part in gathered for v in (part or [])]

    def sum_dicts(self, values: dict[str, float]) -> dict[str, float]:
        """Every rank's metric sums added up (a rank that ran no micro-batch has none of the keys)."""
        gathered: list[dict[str, float] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, values)
        out: dict[str, float] = {}
        for d in gathered:
            for k, v in (d or {}).items():
                out[k] = out.get(k, 0.0) + v
        return out


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's weights on every rank, on the CPU (a collective): what a checkpoint or an engine needs."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                broadcast_from_rank0=False))


def save_learner(learner: Any, path: Path) -> None:
    """The learner's weights and optimizer state as a distributed checkpoint in `path` (every rank calls it), and
    its schedule and guard as learner.json (rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(learner.model, learner.optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path),
             no_dist=not dist.is_initialized())
    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(path) / "learner.json").write_text(json.dumps({"scheduler": learner.scheduler.state_dict(),
                                                             "bad_steps": learner.guard.bad_steps}))


def load_learner(learner: Any, path: Path) -> None:
    """Restore what save_learner wrote, whatever number of ranks wrote it (every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(learner.model, learner.optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp_load(state, Path(path), no_dist=not dist.is_initialized())  # unpickles data only (train/safe_load.py)
    set_state_dict(learner.model, learner.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    side_path = Path(path) / "learner.json"
    try:
        side = json.loads(side_path.read_text())
        learner.scheduler.load_state_dict(side["scheduler"])
        learner.guard.bad_steps = int(side["bad_steps"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"{side_path}: not the learner's schedule ({type(e).__name__}: {e}); delete this "
                        "checkpoint to resume from the one before, or --fresh") from None
