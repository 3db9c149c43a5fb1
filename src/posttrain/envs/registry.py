"""Find environments by registry name, by entry point (group `posttrain.envs`) or by import path `pkg.mod:Class`
or `path/to/file.py:Class`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from posttrain.envs.base import Environment
from posttrain.errors import UserError
from posttrain.registry import import_object

ENVIRONMENTS: dict[str, Callable[..., Environment]] = {}
ENTRY_POINT_GROUP = "posttrain.envs"


def register_env(name: str):
    def deco(cls):
        ENVIRONMENTS[name] = cls
        cls.name = name
        return cls

    return deco


def _load_builtins() -> None:
    # Imported for their @register_env side effect.
    from posttrain.envs import builtin  # noqa: F401


def _resolve(name: str) -> Callable[..., Environment]:
    _load_builtins()
    if name in ENVIRONMENTS:
        return ENVIRONMENTS[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    if ":" in name:  # 'pkg.module:Class' or 'path/to/file.py:Class'
        return import_object(name, what="env.name")
    raise UserError(f"env.name={name!r} is not a known environment; known: {', '.join(available_envs())} "
                    "(or give an import path 'pkg.module:Class', or register an entry point in group "
                    f"'{ENTRY_POINT_GROUP}')")


def available_envs() -> list[str]:
    _load_builtins()
    names = set(ENVIRONMENTS) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def describe_envs() -> list[tuple[str, str]]:
    """(name, one-line description) of every available environment, for `posttrain envs`.

    The description is the first line of the class docstring; an entry point that fails to load is listed with
    its error instead of breaking the listing.
    """
    rows = []
    for name in available_envs():
        try:
            factory = _resolve(name)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not hide the others
            rows.append((name, f"(cannot load: {e})"))
            continue
        doc = inspect.getdoc(factory) or ""
        rows.append((name, doc.strip().splitlines()[0] if doc.strip() else ""))
    return rows


def make_env(name: str, args: dict[str, Any] | None = None) -> Environment:
    """Build an environment; an argument its constructor does not take is an error naming it."""
    factory = _resolve(name)
    args = dict(args or {})
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(args) - set(params))
        if unknown:
            raise UserError(f"env.args: {name!r} takes no argument {unknown[0]!r}; it takes {sorted(params)}")
    try:
        env = factory(**args)
    except (TypeError, ValueError) as e:
        raise UserError(f"env.args for {name!r}: {e}") from e
    if not isinstance(getattr(env, "name", None), str):  # an import-path class need not name itself
        try:
            env.name = name
        except AttributeError:
            raise UserError(f"env.name={name!r}: the environment has no `name` attribute and cannot be given one") from None
    return env
