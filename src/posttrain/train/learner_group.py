"""A Learner run as N sharded ranks, driven from one controller process.

    group = launch_group(policy, LearnerSpec(type(policy), policy.config, learner_args),
                         LocalRanks(2, threads=1), scratch=run_dir / "shards")
    result = group.train_step(seqs, loss_fn)                    # the Learner's interface, unchanged
    engine.update_weights(group.weights(), version)

A recipe gets one with `[learner] world_size = N` (compose.learner_launcher; the ranks and their local processes
are train/ranks.py, Ray actors dist/ray_learner.py). One detail makes the ranks agree: every forward pass is a collective (FSDP gathers
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

import copy
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from posttrain.tracking.ledger import FlopModel
from posttrain.train.learner import FrozenModel, Learner, LossFn, Sequences, StepResult
from posttrain.train.ranks import LearnerRank, LearnerSpec, LocalRanks, RankError

__all__ = ["LearnerGroup", "LearnerRank", "LearnerSpec", "LocalRanks", "RankError", "launch_group"]


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
