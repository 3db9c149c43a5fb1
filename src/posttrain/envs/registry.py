"""Find environments by registry name, by entry point (group `posttrain.envs`) or by import path `pkg.mod:Class`
or `path/to/file.py:Class`.

The built-ins are a table of import paths (`BUILTINS`), each imported when a recipe first names it; an environment
module does not register itself (its class names itself with `name = "..."`). User code registers with
`@register_env("name")`; an installed package through an entry point `name = "pkg.module:Class"`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from posttrain.envs.base import Environment
from posttrain.envs.multiturn import episode_rules, is_multi_turn
from posttrain.envs.prompting import PROMPT_ARGS, Instructed
from posttrain.errors import UserError
from posttrain.records import Task
from posttrain.registry import Registry, import_object

ENTRY_POINT_GROUP = "posttrain.envs"
# Adapters (reasoning_gym, math, jsonl, code) import their optional dependencies lazily, inside the class, so
# importing any of these never needs an extra.
BUILTINS = {
    "arithmetic": "posttrain.envs.arithmetic:Arithmetic",
    "calculator": "posttrain.envs.calculator:Calculator",
    "code": "posttrain.envs.code:Code",
    "humaneval": "posttrain.envs.humaneval:HumanEval",
    "countdown": "posttrain.envs.countdown:Countdown",
    "guess_number": "posttrain.envs.guess_number:GuessNumber",
    "jsonl": "posttrain.envs.jsonl:Jsonl",
    "math": "posttrain.envs.jsonl:Math",
    "mixture": "posttrain.envs.mixture:Mixture",
    "reasoning_gym": "posttrain.envs.rgym:ReasoningGym",
    "retry_with_feedback": "posttrain.envs.retry:RetryWithFeedback",
    "sorting": "posttrain.envs.sorting:Sorting",
    "strings": "posttrain.envs.strings:Strings",
}
ENVIRONMENTS: Registry[Callable[..., Environment]] = Registry("environment", builtins=BUILTINS,
                                                              entry_point_group=ENTRY_POINT_GROUP)


def register_env(name: str):
    """Decorator for user code: ``@register_env("my_env")`` on a class or factory; it may run again (a notebook
    cell), replacing the earlier entry."""

    def deco(cls):
        ENVIRONMENTS.register(name, replace=True)(cls)
        cls.name = name
        return cls

    return deco


def _resolve(name: str) -> Callable[..., Environment]:
    if name in ENVIRONMENTS:
        return ENVIRONMENTS.get(name)
    if ":" in name:  # 'pkg.module:Class' or 'path/to/file.py:Class'
        return import_object(name, what="env.name")
    raise UserError(f"env.name={name!r} is not a known environment; known: {', '.join(available_envs())} "
                    "(or give an import path 'pkg.module:Class', or register an entry point in group "
                    f"'{ENTRY_POINT_GROUP}')")


def available_envs() -> list[str]:
    return ENVIRONMENTS.names()


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
    """Build an environment and check it (`check_env`); an argument its constructor does not take, or a
    constructor that raises, is an error naming it."""
    factory = _resolve(name)
    if not callable(factory):
        raise UserError(f"env.name={name!r} names {_short(factory)}, not an environment class or function")
    args = dict(args or {})
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without a signature (some builtins): pass the args as given
        params = {"kwargs": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}
    # hint and system_prompt are every environment's (envs/prompting.py); one whose constructor takes hint uses its own
    instruction = {k: args.pop(k) for k in PROMPT_ARGS if k in args and k not in params}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(args) - set(params))
        if unknown:
            raise UserError(f"env.args: {name!r} takes no argument {unknown[0]!r}; it takes {sorted(params)}")
    try:
        env = factory(**args)
    except (TypeError, ValueError) as e:
        raise UserError(f"env.args for {name!r}: {e}") from e
    except UserError:
        raise
    except Exception as e:  # the user's constructor failed: a one-line error naming it, not a traceback
        raise UserError(f"env.name={name!r}: building it raised {type(e).__name__}: {e}") from e
    if instruction:
        try:
            env = Instructed(env, **instruction)
        except ValueError as e:
            raise UserError(f"env.args for {name!r}: {e}") from e
    if not isinstance(getattr(env, "name", None), str):  # an import-path class need not name itself
        try:
            env.name = name
        except AttributeError:
            raise UserError(f"env.name={name!r}: the environment has no `name` attribute and cannot be given one") from None
    check_env(env, name)
    return env


_NO_TASK = object()


def check_env(env: Any, name: str) -> None:
    """What a run asks of an environment, tried once on its first training task: `tasks` and `prompt` callable,
    `tasks("train", 0)` yields Tasks without raising, `prompt` returns a str or a list of {role, content}
    messages, and a multi-turn environment's episode attributes are well-formed (envs/multiturn.py
    `episode_rules`). A failure is a UserError naming the environment, before any run directory is touched."""
    for method in ("tasks", "prompt"):
        if not callable(getattr(env, method, None)):
            raise UserError(f"env.name={name!r}: the environment has no {method}() method")
    if is_multi_turn(env):
        try:
            episode_rules(env)
        except UserError as e:
            raise UserError(f"env.name={name!r}: {e}") from None
    try:
        task = next(iter(env.tasks("train", 0)), _NO_TASK)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"env.name={name!r}: tasks('train', 0) raised {type(e).__name__}: {e}") from e
    if task is _NO_TASK:  # no training tasks: the samplers say so where they need some
        return
    if not isinstance(task, Task):
        raise UserError(f"env.name={name!r}: tasks() yielded a {type(task).__name__}, not a posttrain Task")
    try:
        prompt = env.prompt(task)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"env.name={name!r}: prompt() of task {task.id!r} raised {type(e).__name__}: {e}") from e
    if not _is_prompt(prompt):
        raise UserError(f"env.name={name!r}: prompt() of task {task.id!r} returned {_short(prompt)}; it must return "
                        "a str or a list of {'role': str, 'content': str} messages")


def _is_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return True
    return isinstance(prompt, list) and bool(prompt) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt)


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"
