"""A Learner run as N sharded ranks, driven from one controller process.

    group = launch_group(policy, LearnerSpec(type(policy), policy.config, learner_args),
                         LocalRanks(2, threads=1), scratch=run_dir / "shards")
    result = group.train_step(seqs, loss_fn)                    # the Learner's interface, unchanged
    engine.update_weights(group.weights(), version)

A recipe gets one with `[learner] world_size = N` (runner.learner_launcher; ranks as local processes here or as Ray
actors, dist/ray_learner.py). One detail makes the ranks agree: every forward pass is a collective (FSDP gathers
each block's weights in it), so every rank must run as many passes, in the same order, each step. Micro-batches
are dealt out with zero-weighted passes for a rank that has one fewer, and a sharded learner gives every batch its
own prompt pass (forward.pack's prompt_pass), since a micro-batch with a shared prompt otherwise takes two passes
and one without takes one: that difference once deadlocked a run in its first backward.

The controller samples, scores, evaluates and logs; it calls the same methods (train_step, logprobs, weights,
state_dict, load_state_dict) on a LearnerGroup that it calls on a Learner. Each call goes to every rank with the
same arguments; every rank runs a plain Learner over its shard of the policy (train/sharding.py), its share of the micro-batches, and the collectives that make the
step equal to the single-process one. A rank's reply is rank 0's (the others agree by construction).

Weights. The run's process keeps the full policy (`ctx.policy`: what the engine samples from, what checkpoints
export). `weights()` refreshes it after an update one FSDP unit (decoder layer) at a time: all ranks gather that
unit's shards and rank 0 sends it, so no rank ever holds a second full copy; the seconds it takes are
`last_sync_s`.

Checkpoints. `state_dict()` has every rank write its shards with torch.distributed.checkpoint into `scratch`
and returns {"shards": path}, which the checkpoint moves into step_N/learner_shards; a learner of any world size
resumes from it (1 included: Learner.load_state_dict reads the same directory), and a single-process learner's
state loads into N.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import socket
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.tracking.ledger import FlopModel
from posttrain.train.learner import FrozenModel, Learner, LossFn, Sequences, StepResult


@dataclass(frozen=True)
class LearnerSpec:
    """What a rank needs to build its Learner: the policy's architecture (its weights come from rank 0) and the
    Learner's arguments."""

    model_class: type
    model_config: Any  # the policy's Hugging Face config
    learner_args: dict[str, Any]  # Learner's keyword arguments (activation_checkpointing among them)
    offload_optimizer: bool = False


# ---------------------------------------------------------------------------------------------------------------
# One rank: a plain Learner over a shard, behind a call-by-name interface (a process; a Ray actor later).


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


# ---------------------------------------------------------------------------------------------------------------
# The controller's side: what a stage holds instead of a Learner.


@dataclass
class LearnerGroup:
    """The Learner interface over N ranks. `policy` is the run's full model, kept current by weights()."""

    policy: nn.Module
    spec: LearnerSpec
    ranks: Any  # LocalRanks, or dist.RayRanks: call_each(method, args per rank) -> replies, close()
    scratch: Path  # where state_dict() has the ranks write their shards before a checkpoint takes them
    flop_model: FlopModel = field(init=False)
    last_sync_s: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.flop_model = FlopModel.from_model(self.policy)
        self.world_size = self.ranks.world_size
        host, port = self.ranks.call_each("address", [()] * self.world_size)[0]
        self.ranks.call_each("init_group", [(host, port)] * self.world_size)
        weights = {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}
        buffers = {k: v.detach().cpu() for k, v in self.policy.named_buffers()}
        self.ranks.call_each("build", [(self.spec, weights, buffers)]
                             + [(self.spec, None, buffers)] * (self.world_size - 1))
        self._units: list[list[str]] = self.ranks.call_each("weight_units", [()] * self.world_size)[0]
        self._stale = False

    def _all(self, method: str, *args: Any) -> Any:
        """Every rank runs `method(*args)`; rank 0's reply."""
        return self.ranks.call_each(method, [args] * self.world_size)[0]

    def train_step(self, seqs: Sequences, loss_fn: LossFn, **kwargs: Any) -> StepResult:
        result = self._all("train_step", seqs, loss_fn, kwargs)
        self._stale = True
        return result

    def logprobs(self, seqs: Sequences, *, temperature: float = 1.0) -> tuple[list[Tensor], float]:
        return self._all("logprobs", seqs, temperature)

    def weights(self) -> Mapping[str, Tensor]:
        """The policy's weights after the last update, streamed into the run's full copy one unit at a time."""
        if self._stale:
            t0 = time.time()
            target = self.policy.state_dict()
            for names in self._units:
                for name, tensor in self._all("weights_unit", names).items():
                    target[name].copy_(tensor)
            self.last_sync_s = time.time() - t0
            self._stale = False
        return self.policy.state_dict()

    def frozen_copy(self) -> FrozenModel:
        """The reference of a KL term: a frozen full copy in the controller (the ranks keep only the policy)."""
        self.weights()
        args = self.spec.learner_args
        return FrozenModel(copy.deepcopy(self.policy).eval().requires_grad_(False),
                           micro_batch_size=args["micro_batch_size"], pad_id=args["pad_id"],
                           bf16=args.get("bf16", False), micro_batch_tokens=args.get("micro_batch_tokens"))

    def reset_optimizer(self) -> None:
        self._all("reset_optimizer")

    def state_dict(self) -> dict[str, Any]:
        """The ranks' shards written to the scratch directory (the checkpoint moves it inside itself)."""
        self.weights()  # the checkpoint's Hugging Face export is the run's copy: bring it up to date
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.parent.mkdir(parents=True, exist_ok=True)
        self._all("save", str(self.scratch))
        return {"shards": str(self.scratch), "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "shards" not in state:  # a single-process learner's state: rewritten as shards first
            plain = Learner(self.policy, **self.spec.learner_args)
            plain.load_state_dict(state)
            from posttrain.train.sharding import save_learner

            shutil.rmtree(self.scratch, ignore_errors=True)
            save_learner(plain, self.scratch)
            state = {"shards": str(self.scratch)}
        self._all("load", str(state["shards"]))

    def peak_memory(self) -> list[dict[str, float]]:
        return self.ranks.call_each("peak_memory", [()] * self.world_size)

    def reset_peak_memory(self) -> None:
        self.ranks.call_each("reset_peak_memory", [()] * self.world_size)

    def close(self) -> None:
        self.ranks.close()


def launch_group(policy: nn.Module, spec: LearnerSpec, ranks: Any, *, scratch: Path) -> LearnerGroup:
    """Build the sharded learner on started `ranks` (LocalRanks or dist.RayRanks); they are stopped if it fails."""
    try:
        return LearnerGroup(policy, spec, ranks, scratch)
    except BaseException:
        ranks.close()
        raise
