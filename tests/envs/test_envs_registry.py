"""Registry: names, import paths, argument errors, descriptions."""

from __future__ import annotations

import pytest

from posttrain.envs import Environment, available_envs, describe_envs, make_env
from posttrain.envs.registry import ENVIRONMENTS
from posttrain.errors import UserError

BUILTIN_NAMES = {"arithmetic", "strings", "countdown", "sorting", "reasoning_gym", "math", "jsonl", "code"}


def test_unknown_name_lists_known_environments():
    with pytest.raises(UserError) as e:
        make_env("arithmatic")
    message = str(e.value)
    assert "'arithmatic' is not a known environment" in message
    for name in BUILTIN_NAMES:
        assert name in message


def test_import_path_loading_and_its_errors():
    env = make_env("envs_helpers:Echo", {"n": 2})  # tests/envs is on sys.path under pytest
    assert isinstance(env, Environment) and [t.answer for t in env.tasks("train", 0)] == ["0", "1"]
    with pytest.raises(UserError, match="envs_helpers:Nope.*has no attribute 'Nope'"):
        make_env("envs_helpers:Nope")
    with pytest.raises(UserError, match="no_such_module_xyz:Env.*cannot import"):
        make_env("no_such_module_xyz:Env")


def test_unknown_argument_is_named():
    with pytest.raises(UserError, match="'arithmetic' takes no argument 'digitz'.*'digits'"):
        make_env("arithmetic", {"digitz": 3})
    with pytest.raises(UserError, match="digits must be >= 1"):
        make_env("arithmetic", {"digits": [3, 1]})
    with pytest.raises(UserError, match="depth must be an int or"):
        make_env("strings", {"depth": "deep"})


def test_builtins_are_registered_and_described():
    assert BUILTIN_NAMES <= set(available_envs()) and BUILTIN_NAMES <= set(ENVIRONMENTS)
    described = dict(describe_envs())
    assert BUILTIN_NAMES <= set(described)
    assert described["strings"].startswith("Compose string ops")
    assert all(desc and "\n" not in desc for desc in described.values())
    for name in ("arithmetic", "strings", "countdown", "sorting"):
        env = make_env(name)
        assert isinstance(env, Environment) and env.name == name and env.isolation == "inline"


def test_entry_point_environments_are_found_by_name(monkeypatch):
    """A user's package adds an environment through the `posttrain.envs` entry-point group."""
    from importlib.metadata import EntryPoint

    from posttrain.envs import registry

    ep = EntryPoint(name="user_addition", value="posttrain.envs.arithmetic:Arithmetic", group="posttrain.envs")
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == "posttrain.envs" else [])
    env = registry.make_env("user_addition", {"digits": 2})
    task = next(env.tasks("train", 0))
    assert env.score(task, task.answer).correct
    assert "user_addition" in registry.available_envs()
