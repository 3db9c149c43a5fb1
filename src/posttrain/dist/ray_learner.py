"""Learner ranks as Ray actors: `[learner] launch = "ray"`.

    [learner]
    world_size = 4
    launch = "ray"
    gpus_per_rank = 1            # one GPU each; NCCL between them

One actor per rank, all in one placement group (a bundle of cpus_per_rank CPUs and gpus_per_rank GPUs each, packed
onto as few nodes as fit), so the ranks start together or not at all. Each actor is a LearnerRank
(train/ranks.py), the same object a local rank process serves; rank 0 gives its node's address for the
process group. The controller reaches them through `call_each`, as it reaches local processes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from posttrain.config import DistributedConfig
from posttrain.dist.ray_engine import start_ray
from posttrain.errors import UserError
from posttrain.train.ranks import LearnerRank, RankError

PLACEMENT_TIMEOUT_S = 120.0


class RayRanks:
    def __init__(self, world_size: int, *, threads: int, cpus_per_rank: float, gpus_per_rank: float,
                 cluster: DistributedConfig) -> None:
        self.world_size = world_size
        self.actors: list[Any] = []
        self._started = start_ray(cluster)
        bundle = {"CPU": cpus_per_rank, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
        self.group = placement_group([dict(bundle) for _ in range(world_size)], strategy="PACK")
        try:
            ray.get(self.group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            self.close()
            raise UserError(f"learner: Ray could not place {world_size} ranks of {bundle} within "
                            f"{PLACEMENT_TIMEOUT_S:g} s (cluster resources: {ray.cluster_resources()}); lower "
                            "learner.world_size, cpus_per_rank or gpus_per_rank, or add nodes") from None
        actor = ray.remote(LearnerRank)
        # The driver's import path: a loss or environment class from the user's own module unpickles in the ranks
        # as it does in local rank processes (on other nodes, the paths that exist there count).
        driver_path = os.pathsep.join(p for p in sys.path if p)
        for rank in range(world_size):
            strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank)
            self.actors.append(actor.options(
                num_cpus=cpus_per_rank, num_gpus=gpus_per_rank, scheduling_strategy=strategy,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": driver_path}},
            ).remote(rank, world_size, threads, host="node"))

    def call_each(self, method: str, args_per_rank: Sequence[tuple]) -> list[Any]:
        """Every actor runs `method` with its arguments; a rank that raises or dies stops the wait at once (the
        others may be blocked in a collective that will never complete)."""
        refs = [getattr(a, method).remote(*args) for a, args in zip(self.actors, args_per_rank, strict=True)]
        pending = list(refs)
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            rank = refs.index(ready)
            try:
                ray.get(ready)
            except RayTaskError as e:
                raise RankError(f"learner rank {rank} failed in {method}:\n{e}") from None
            except RayActorError as e:
                raise RankError(f"learner rank {rank} died during {method}: {e}") from None
        return ray.get(refs)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a rank already gone has nothing to close
            ray.get([a.close.remote() for a in self.actors], timeout=30)
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        self.actors = []
        with contextlib.suppress(Exception):
            remove_placement_group(self.group)
        if self._started and ray.is_initialized():
            ray.shutdown()

