"""A registry maps a name from a recipe (``advantage = "dr_grpo"``) to one small function or class.

Every entry of one registry shares one signature, so a recipe swaps a component by changing a string, and adding a
variant is one function, one decorator line and one test (STYLE.md §1). The same class serves the algorithm
registries (algos/), the group filters, the rollout engines and the stages.

    @ADVANTAGES.register("grpo", group_relative=True)      # traits: facts about the entry other code may ask
    def grpo(x: AdvantageInputs, *, eps: float = 1e-6): ...

Hyperparameters. An entry's keyword-only parameters (those after ``*``) are its hyperparameters, typed by their
annotations, with their defaults; ``hyperparameters(name)`` validates a recipe table such as
``[rl.advantage_args]`` against them (an unknown key or a wrong type is an error naming it). Constraints and a
description can ride on the annotation: ``eps: Annotated[float, Field(gt=0, description="...")] = 1e-6``.

Out-of-tree entries. A name containing ":" is an import path, ``"package.module:function"`` or
``"path/to/file.py:function"``; it is imported on first use and needs no registration.

Built-ins and plugins, found lazily (the one plugin idiom of posttrain; nothing imports every built-in up front):

    Registry("environment", builtins={"arithmetic": "posttrain.envs.arithmetic:Arithmetic", ...},
             entry_point_group="posttrain.envs")        # a table: each entry imported on first use
    Registry("stage", builtin_modules=("posttrain.recipes.sft", ...),
             entry_point_group="posttrain.stages")      # modules that register their entries when imported

``builtins`` lists entries by name without importing them; ``builtin_modules`` are imported, once, on the first
lookup of any kind (names, membership, get), so a listing is complete. An installed package adds entries through
the entry-point group in the form of the registry's built-ins: ``name = "pkg.module:obj"`` for a table (looked up
by name on each use, never imported for a listing), a module to import (``"pkg.module"``) where the built-ins are
modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from posttrain.errors import ConfigError, UserError

F = TypeVar("F", bound=Callable[..., object])


USER_MODULE_PREFIX = "posttrain_user_"


class ExitAtImport(BaseException):
    """A module called os._exit() while import_object imported it."""


def load_user_file(key: str, path: Path) -> Any:
    """The module of a user's .py file under the name `key` in sys.modules (loaded once). None if it cannot be."""
    module = sys.modules.get(key)
    if module is not None:
        return module
    loader_spec = importlib.util.spec_from_file_location(key, path)
    if loader_spec is None or loader_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[key] = module  # before exec, so pickling and dataclasses inside it work
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module


def user_files() -> dict[str, str]:
    """The user .py files loaded so far, {module key: path}: what another process must load before it can
    unpickle an object defined in one of them (envs/scoring.py's workers)."""
    return {k: m.__file__ for k, m in list(sys.modules.items()) if k.startswith(USER_MODULE_PREFIX) and m.__file__}


def import_object(spec: str, *, what: str) -> Any:
    """``"pkg.module:attr"`` or ``"path/to/file.py:attr"`` -> the object. `what` names the recipe key in errors.

    Anything the import raises or does to end the process (sys.exit, os._exit, KeyboardInterrupt, a BaseException
    subclass) is a UserError naming the file; only a real Ctrl-C stays a KeyboardInterrupt."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{what}={spec!r}: an import path must look like 'package.module:name' or 'file.py:name'")
    sigint: list[bool] = []
    try:
        with _watch_sigint(sigint), _exit_raises():
            if module_name.endswith(".py"):
                path = Path(module_name).expanduser().resolve()
                if not path.is_file():
                    raise UserError(f"{what}={spec!r}: {path} is not a file")
                key = USER_MODULE_PREFIX + hashlib.sha1(str(path).encode()).hexdigest()[:12]
                module = load_user_file(key, path)
                if module is None:
                    raise UserError(f"{what}={spec!r}: cannot load {path} as a Python module")
            else:
                module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{what}={spec!r}: cannot import it ({type(e).__name__}: {e})") from e
    except BaseException as e:  # sys.exit, os._exit, KeyboardInterrupt, a BaseException subclass at import
        if isinstance(e, ExitAtImport):
            raise UserError(f"{what}={spec!r}: importing it called {e}; a file posttrain imports must not exit "
                            "at import") from None
        if (isinstance(e, KeyboardInterrupt) and sigint) or type(e).__module__.split(".")[0] == "posttrain":
            raise  # a real Ctrl-C, or posttrain's own stop (SIGTERM): as anywhere else
        raise UserError(f"{what}={spec!r}: importing it raised {repr(e)[:200]}; a file posttrain imports must "
                        "not exit or interrupt at import") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"{what}={spec!r}: {module_name} has no attribute {attr!r}") from None


@contextlib.contextmanager
def _exit_raises() -> Iterator[None]:
    """os._exit() raises ExitAtImport while active: an import that calls it would otherwise end the process with
    no word (exit status 0 for os._exit(0)). A reference to it kept past then exits as os._exit does."""
    real, active = os._exit, [True]

    def exit_(status: int) -> None:
        if active:
            raise ExitAtImport(f"os._exit({status!r})")
        real(status)

    os._exit = exit_  # type: ignore[assignment]
    try:
        yield
    finally:
        active.clear()
        os._exit = real


@contextlib.contextmanager
def _watch_sigint(fired: list[bool]) -> Iterator[None]:
    """Appends to `fired` when SIGINT arrives while active, so that a KeyboardInterrupt a user file raises itself
    is told apart from the user pressing Ctrl-C (only in the main thread, under a Python-level SIGINT handler)."""
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if on_main else None
    if not callable(previous):
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        fired.append(True)
        previous(signum, frame)

    signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Registry(Generic[F]):
    """Name -> entry for one kind of component. `kind` names it in error messages ("advantage"); `builtins`,
    `builtin_modules` and `entry_point_group` say where entries not registered in code are found (module
    docstring)."""

    def __init__(self, kind: str, *, builtins: Mapping[str, str] | None = None,
                 builtin_modules: Sequence[str] = (), entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, F] = {}
        self._traits: dict[str, dict[str, Any]] = {}
        self._builtins = dict(builtins or {})  # name -> "pkg.module:obj", imported on first use
        self._modules = tuple(builtin_modules)
        self._loaded = not self._modules  # every built-in module (and module plugin) imported
        self._importing = False  # they are being imported, by the thread holding _lock
        self._lock = threading.RLock()

    def register(self, name: str, *, replace: bool = False, **traits: Any) -> Callable[[F], F]:
        """Decorator: ``@ADVANTAGES.register("grpo", group_relative=True)``. A second entry under one name is a
        bug, so it raises, unless `replace` (user code that may run twice, as a notebook cell does)."""

        def deco(entry: F) -> F:
            if not replace and (name in self._entries or name in self._builtins):
                raise ValueError(f"{self.kind} {name!r} is already registered "
                                 f"(by {self._entries.get(name, self._builtins.get(name))!r})")
            self._entries[name] = entry
            self._traits[name] = dict(traits)
            return entry

        return deco

    def get(self, name: str) -> F:
        self._load()
        if name in self._entries:
            return self._entries[name]
        if name in self._builtins:  # a built-in's import error is a bug: it propagates as it is
            module, _, attr = self._builtins[name].partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries.setdefault(name, entry)
            return self._entries[name]
        plugin = next((ep for ep in self._plugins() if ep.name == name), None)
        if plugin is not None:
            try:
                return plugin.load()
            except Exception as e:
                raise UserError(f"{self.kind} plugin {name!r} ({plugin.value}) cannot be imported: "
                                f"{type(e).__name__}: {e}") from e
        if ":" in name:
            return import_object(name, what=self.kind)
        raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())} "
                        "(or an import path 'package.module:name')")

    __getitem__ = get

    def _load(self) -> None:
        """Import the built-in modules and the module plugins, once; each registers its own entries. A lookup made
        while they import (by one of them) sees what is registered so far."""
        if self._loaded:
            return
        with self._lock:  # another thread waits for a complete registry; the importing one passes (reentrant)
            if self._loaded or self._importing:
                return
            self._importing = True
            try:
                for module in self._modules:
                    importlib.import_module(module)
                for ep in entry_points(group=self.entry_point_group) if self.entry_point_group else ():
                    try:
                        importlib.import_module(ep.value.partition(":")[0])
                    except Exception as e:
                        raise UserError(f"{self.kind} plugin {ep.name!r} ({ep.value}) cannot be imported: "
                                        f"{type(e).__name__}: {e}") from e
                self._loaded = True  # not after a failure: the next lookup tries again, and fails again, loudly
            finally:
                self._importing = False

    def _plugins(self) -> list[EntryPoint]:
        """The entry points that name entries (a table registry's), read afresh: installing a plugin needs no
        restart of a long-lived process, and a lookup that a built-in answers never reads them."""
        if self.entry_point_group is None or self._modules:
            return []
        return list(entry_points(group=self.entry_point_group))

    def call(self, name: str, *args: Any, shape: tuple[int, ...], **kwargs: Any) -> Any:
        """self.get(name)(*args, **kwargs) for an entry that returns a tensor. An import-path (user) entry is checked:
        one that raises, or returns anything but a tensor of `shape` with finite values, is a UserError naming it.
        A registered entry is called as it is (its tests pin what it returns)."""
        fn = self.get(name)
        if name in self._entries:
            return fn(*args, **kwargs)
        label = f"{self.kind} {name!r}"
        try:
            out = fn(*args, **kwargs)
        except Exception as e:
            raise UserError(f"{label} raised {type(e).__name__}: {e}") from e
        got = tuple(out.shape) if hasattr(out, "shape") and hasattr(out, "isfinite") else None
        if got != tuple(shape):
            what = f"shape {got}" if got is not None else f"a {type(out).__name__}"
            raise UserError(f"{label} returned {what}, expected a tensor of shape {tuple(shape)}")
        if not bool(out.isfinite().all()):
            raise UserError(f"{label} returned a non-finite value (NaN or inf)")
        return out

    def trait(self, name: str, key: str, default: Any = None) -> Any:
        """A registered trait of the entry; an import-path entry may carry it as an attribute of the function."""
        if name in self._traits:
            return self._traits[name].get(key, default)
        return getattr(self.get(name), key, default)

    def hyperparameters(self, name: str) -> type[BaseModel]:
        """The entry's hyperparameters as a pydantic model (extra keys forbidden), from its keyword-only params."""
        return _hyperparameter_model(self.get(name), f"{self.kind} {name!r}")

    def validate_args(self, name: str, args: dict[str, Any], *, key: str) -> dict[str, Any]:
        """`args` checked against the entry's hyperparameters, every default filled in. Errors (ConfigError)
        name `key`, the recipe key of the table ("rl.policy_loss_args")."""
        model = self.hyperparameters(name)
        try:
            return model.model_validate(args).model_dump()
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            takes = ", ".join(model.model_fields) or "no hyperparameters"
            if first["type"] == "extra_forbidden":
                raise ConfigError(f"{key}.{field}", f"{self.kind} {name!r} has no hyperparameter {field!r}; "
                                  f"it takes: {takes}") from None
            raise ConfigError(f"{key}.{field}", f"{first['msg']} ({self.kind} {name!r} takes: {takes})") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(set(self._entries) | set(self._builtins) | {ep.name for ep in self._plugins()})

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries or name in self._builtins or any(ep.name == name for ep in self._plugins())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


@cache
def _hyperparameter_model(fn: Callable[..., Any], label: str) -> type[BaseModel]:
    try:
        params = inspect.signature(fn, eval_str=True).parameters.values()
    except (TypeError, ValueError, NameError) as e:
        raise UserError(f"{label}: cannot read its signature ({e})") from None
    fields: dict[str, Any] = {}
    for p in params:
        if p.kind is not p.KEYWORD_ONLY:
            continue
        if p.default is p.empty:
            raise UserError(f"{label}: hyperparameter {p.name!r} needs a default")
        annotation = Any if p.annotation is p.empty else p.annotation
        fields[p.name] = (annotation, p.default)
    return create_model(f"{label} hyperparameters", __config__=ConfigDict(extra="forbid"), **fields)
