"""Placement and transport on Ray: every Ray import of posttrain lives in this package.

    from posttrain.dist import RayEngine     # needs `pip install -e '.[ray]'`
"""

from __future__ import annotations

import importlib.util
from typing import Any

from posttrain.errors import MissingExtraError


def __getattr__(name: str) -> Any:
    if name in ("RayEngine", "start_ray", "group_chunks", "RayScoring"):
        if importlib.util.find_spec("ray") is None:
            raise MissingExtraError("ray", "ray")
        from posttrain.dist import ray_engine, scoring

        return getattr(scoring if name == "RayScoring" else ray_engine, name)
    raise AttributeError(name)


__all__ = ["RayEngine", "RayScoring", "group_chunks", "start_ray"]
