"""Command-line values the commands parse the same way."""

from __future__ import annotations

from typing import Any

from posttrain.config import parse_override


def parse_env_args(items: list[str]) -> dict[str, Any]:
    """--env-arg KEY=VALUE items -> the environment's keyword arguments (values parsed as in --set)."""
    args: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        args[".".join(key)] = value
    return args
