"""The rank side of a sharded learner (train/learner_group.py drives it): what one rank runs and how the
controller reaches N of them on this machine.

    ranks = LocalRanks(2, threads=1)                      # N spawned processes, a pipe to each, each serving a
    replies = ranks.call_each("train_step", [args] * 2)   # LearnerRank: one reply per rank, a rank's error raised
    ranks.close()                                         # as RankError with its traceback

A LearnerRank is a plain Learner over its shard of the policy (train/sharding.py) behind a call-by-name interface:
a local process serves it here (`_serve`), a Ray actor is one (dist/ray_learner.py: RayRanks, the other transport
with the same `call_each` / `close`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.train.learner import Learner, LossFn, Sequences, StepResult


@dataclass(frozen=True)
class LearnerSpec:
    """What a rank needs to build its Learner: the policy's architecture (its weights come from rank 0) and the
    Learner's arguments."""

    model_class: type
    model_config: Any  # the policy's Hugging Face config
    learner_args: dict[str, Any]  # Learner's keyword arguments (activation_checkpointing among them)
    offload_optimizer: bool = False


# ---------------------------------------------------------------------------------------------------------------
# One rank: a plain Learner over a shard, behind a call-by-name interface (a local process, or a Ray actor).


class LearnerRank:
    def __init__(self, rank: int, world_size: int, threads: int, *, host: str = "127.0.0.1") -> None:
        """host: the address other ranks reach this one at; "node": this machine's own (a Ray actor's node)."""
        self.rank, self.world_size = rank, world_size
        self.host = node_address() if host == "node" else host
        torch.set_num_threads(threads)
        self.learner: Learner | None = None

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the process group (asked of rank 0 only)."""
        return self.host, free_port(self.host)

    def init_group(self, host: str, port: int) -> None:
        import torch.distributed as dist

        if torch.cuda.is_available():  # local ranks see every GPU and take one each; a Ray actor sees its own only
            torch.cuda.set_device(self.rank % torch.cuda.device_count())
        if self.world_size == 1:  # one rank is a plain learner in its own process (a benchmark's baseline)
            return
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=f"tcp://{host}:{port}",
                                rank=self.rank, world_size=self.world_size)

    def build(self, spec: LearnerSpec, weights: Mapping[str, Tensor] | None, buffers: Mapping[str, Tensor]) -> None:
        """The rank's Learner: the architecture built here, sharded, then filled from rank 0's `weights`.

        With N ranks the model is built on the meta device, sharded, and only then given memory: a rank never
        holds the whole model (rank 0 holds the full `weights` it broadcasts until build returns). `buffers`
        (the rotary tables, not in a state dict) come from the controller, since the meta model has none."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from posttrain.train.sharding import DataParallel, shard

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if self.world_size == 1:
            model = spec.model_class(spec.model_config).to(device)
            model.load_state_dict(dict(weights or {}))
            self.learner = Learner(model.train(), **spec.learner_args)
            return
        with torch.device("meta"):
            model = spec.model_class(spec.model_config)
        shard(model, offload=spec.offload_optimizer)
        # FSDP2 keeps tied parameters tied through to_empty; offloaded shards live in CPU memory
        model.to_empty(device="cpu" if spec.offload_optimizer else device)
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
        set_model_state_dict(model, dict(weights or {}),
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        self.learner = Learner(model.train(), **spec.learner_args, data_parallel=DataParallel.current())

    def train_step(self, seqs: Sequences, loss_fn: LossFn, kwargs: dict[str, Any]) -> StepResult | None:
        result = self._learner.train_step(seqs, loss_fn, **kwargs)
        return result if self.rank == 0 else None

    def logprobs(self, seqs: Sequences, temperature: float) -> tuple[list[Tensor], float] | None:
        out = self._learner.logprobs(seqs, temperature=temperature)
        return out if self.rank == 0 else None

    def weight_units(self) -> list[list[str]]:
        """The names of the policy's tensors, one list per FSDP unit (decoder layer), the root's last."""
        units: dict[str, list[str]] = {}
        for name in self._learner.model.state_dict():
            parts = name.split(".")
            key = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else "root"
            units.setdefault(key, []).append(name)
        return [names for key, names in units.items() if key != "root"] + [units.get("root", [])]

    def weights_unit(self, names: list[str]) -> dict[str, Tensor] | None:
        """Those tensors gathered whole (a collective), sent by rank 0 only."""
        from posttrain.train.sharding import full

        state = self._learner.model.state_dict()
        gathered = {n: full(state[n]).detach().cpu() for n in names}
        return gathered if self.rank == 0 else None

    def save(self, path: str) -> None:
        from posttrain.train.sharding import save_learner

        save_learner(self._learner, Path(path))

    def load(self, path: str) -> None:
        from posttrain.train.sharding import load_learner

        load_learner(self._learner, Path(path))

    def reset_optimizer(self) -> None:
        self._learner.reset_optimizer()

    def peak_memory(self) -> dict[str, float]:
        """This rank's peak resident memory (MiB) since it started or since reset_peak_memory(), and on a GPU
        its peak allocated memory."""
        out = {"rss_mib": _peak_rss_mib()}
        if torch.cuda.is_available():
            out["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out

    def reset_peak_memory(self) -> None:
        """Start the peak over (Linux: /proc/self/clear_refs), e.g. to measure training apart from building."""
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def state_memory(self) -> dict[str, float]:
        """MiB this rank holds of the policy's parameters, their gradients (as large) and the optimizer state."""
        from posttrain.train.sharding import local_part

        params = sum(local_part(p).nbytes for p in self._learner.model.parameters())
        optim = sum(local_part(t).nbytes for state in self._learner.optimizer.state.values()
                    for t in state.values() if isinstance(t, Tensor) and t.dim() > 0)
        return {"params_mib": params / 2**20, "grads_mib": params / 2**20, "optimizer_mib": optim / 2**20}

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    @property
    def _learner(self) -> Learner:
        if self.learner is None:
            raise RuntimeError("LearnerRank: build() was not called")
        return self.learner


def _peak_rss_mib() -> float:
    """VmHWM (resettable) where /proc has it, else the process's lifetime maximum."""
    import resource

    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def node_address() -> str:
    """This machine's address on the network the other nodes share (the interface its default route leaves by;
    a UDP connect sends nothing), else the loopback address when there is no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------------
# Transports: how the controller reaches its ranks.


class RankError(RuntimeError):
    """A rank raised; the message carries its traceback."""


def _serve(rank: int, world_size: int, threads: int, conn: Any) -> None:
    """A local rank process: call LearnerRank methods by name until told to stop."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a stuck rank is
    ranked = LearnerRank(rank, world_size, threads)
    while True:
        method, args = conn.recv()
        if method is None:
            ranked.close()
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(ranked, method)(*args)))
        except BaseException:  # noqa: BLE001 - the controller re-raises it with the rank's traceback
            conn.send(("error", traceback.format_exc()))


class LocalRanks:
    """N processes on this machine (spawned, so each imports torch afresh), a pipe to each."""

    def __init__(self, world_size: int, *, threads: int) -> None:
        import multiprocessing as mp

        os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # inherited by the spawned ranks
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.conns, self.procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, world_size, threads, child), daemon=True,
                               name=f"posttrain-learner-rank{rank}")
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def call_each(self, method: str, args_per_rank: Sequence[tuple]) -> list[Any]:
        for conn, args in zip(self.conns, args_per_rank, strict=True):
            conn.send((method, args))
        replies: dict[int, tuple[str, Any]] = {}
        while len(replies) < self.world_size:  # the first rank to fail stops the wait (the others may be
            for rank, (conn, proc) in enumerate(zip(self.conns, self.procs, strict=True)):  # stuck in a collective)
                if rank in replies:
                    continue
                if conn.poll(0.05):
                    replies[rank] = conn.recv()
                    if replies[rank][0] == "error":
                        _unwrap(method, [replies[rank]], first_rank=rank)
                elif not proc.is_alive():
                    raise RankError(f"learner rank {rank} died (exit code {proc.exitcode}) during {method}")
        return _unwrap(method, [replies[r] for r in range(self.world_size)])

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=True):
            try:
                if proc.is_alive():
                    conn.send((None, ()))
                    if conn.poll(30):
                        conn.recv()
            except (OSError, EOFError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def _unwrap(method: str, replies: list[tuple[str, Any]], first_rank: int = 0) -> list[Any]:
    for rank, (status, value) in enumerate(replies, start=first_rank):
        if status == "error":
            raise RankError(f"learner rank {rank} failed in {method}:\n{value}")
    return [value for _, value in replies]
