"""Placement and transport on Ray: every Ray import of posttrain lives in this package.

    from posttrain.dist import RayEngine     # rollout workers; needs `pip install -e '.[ray]'`
    from posttrain.dist import RayRanks      # learner ranks
"""

from __future__ import annotations

import importlib.util
from typing import Any

from posttrain.errors import MissingExtraError


def __getattr__(name: str) -> Any:
    if name in ("RayEngine", "start_ray", "group_chunks", "RayScoring", "RayRanks"):
        if importlib.util.find_spec("ray") is None:
            raise MissingExtraError("ray", "ray")
        from posttrain.dist import ray_engine, ray_learner, scoring

        module = {"RayScoring": scoring, "RayRanks": ray_learner}.get(name, ray_engine)
        return getattr(module, name)
    raise AttributeError(name)


__all__ = ["RayEngine", "RayRanks", "RayScoring", "group_chunks", "start_ray"]
