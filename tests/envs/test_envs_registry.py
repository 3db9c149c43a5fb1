"""Registry: names, import paths, argument errors, descriptions."""

from __future__ import annotations

import pytest

from posttrain.envs import Environment, available_envs, describe_envs, make_env
from posttrain.envs.registry import ENVIRONMENTS
from posttrain.errors import UserError
from posttrain.records import Task

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

    import posttrain.registry
    from posttrain.envs import registry

    ep = EntryPoint(name="user_addition", value="posttrain.envs.arithmetic:Arithmetic", group="posttrain.envs")
    monkeypatch.setattr(posttrain.registry, "entry_points", lambda group: [ep] if group == "posttrain.envs" else [])
    env = registry.make_env("user_addition", {"digits": 2})
    task = next(env.tasks("train", 0))
    assert env.score(task, task.answer).correct
    assert "user_addition" in registry.available_envs()
    broken = EntryPoint(name="broken", value="no_such_module_xyz:Env", group="posttrain.envs")
    monkeypatch.setattr(posttrain.registry, "entry_points", lambda group: [broken])
    with pytest.raises(UserError, match=r"environment plugin 'broken' \(no_such_module_xyz:Env\) cannot be imported"):
        registry.make_env("broken")
    assert dict(describe_envs())["broken"].startswith("(cannot load: ")


def test_the_builtin_table_names_each_environment_and_imports_none_to_list_them():
    """envs/registry.py BUILTINS is the one list of built-ins: every entry is the class of that name, and listing
    the environments imports none of their modules (a fresh interpreter)."""
    import subprocess
    import sys

    from posttrain.envs.registry import BUILTINS

    for name in BUILTINS:
        assert ENVIRONMENTS.get(name).name == name
    code = ("import sys; from posttrain.envs import available_envs; names = available_envs(); "
            "print(sorted(m for m in sys.modules if m.startswith('posttrain.envs.') and m.rsplit('.', 1)[1] in "
            "('arithmetic', 'code', 'countdown', 'jsonl', 'rgym', 'sorting', 'strings', 'retry', 'calculator', "
            "'guess_number')), len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]" and int(out[-1]) >= len(BUILTINS)


def test_register_env_is_for_user_code_and_may_run_again():
    from posttrain.envs import register_env

    try:
        for _ in range(2):  # a notebook cell run twice

            @register_env("user_echo_test")
            class Echo:
                def tasks(self, split, seed):
                    return iter([Task(id="0", question="q", answer="a", solution="a")])

                def prompt(self, task):
                    return task.question

                def score(self, task, completion):
                    raise NotImplementedError

        assert Echo.name == "user_echo_test" and ENVIRONMENTS.get("user_echo_test") is Echo
        assert make_env("user_echo_test").name == "user_echo_test"
    finally:
        del ENVIRONMENTS._entries["user_echo_test"]
