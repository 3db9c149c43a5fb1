"""Stages as plugins: a stage is a name, its config section and its run function, registered by its own file.

    @register_stage("rl", RLConfig)                   # in recipes/rl.py: the whole registration
    def run(ctx: RunContext, cfg: RLConfig, resume: StageResume | None) -> None: ...

`recipe = ["sft", "rl"]` names registered stages; each named stage's TOML section (`[rl]`) is validated by its
config class, and a section exists only for a stage the recipe uses. The built-in stages are the modules of
posttrain/recipes/, found by `load_stages` (every module there registers itself when imported); an installed
package adds stages through the entry-point group `posttrain.stages` (each entry point is a module to import).
Adding a stage is one new file in recipes/ and its test.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from posttrain.errors import UserError
from posttrain.registry import Registry

ENTRY_POINT_GROUP = "posttrain.stages"
BUILTIN = "posttrain.recipes"


@dataclass(frozen=True)
class StageResume:
    """What a stage gets back from a checkpoint written in the middle of it."""

    stage_step: int  # steps of this stage already done
    learner: dict[str, Any] | None  # Learner.state_dict()
    state: dict[str, Any] = field(default_factory=dict)  # the stage's own resumable state (data, controllers)


@dataclass(frozen=True)
class Stage:
    name: str
    config: type  # a config.Section subclass: the stage's TOML section
    run: Callable[..., None]  # run(ctx, cfg, resume: StageResume | None)

    @property
    def doc(self) -> str:
        return (self.run.__module__ and importlib.import_module(self.run.__module__).__doc__ or "").strip()


STAGES: Registry[Stage] = Registry("stage")


def register_stage(name: str, config: type) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def deco(run: Callable[..., None]) -> Callable[..., None]:
        STAGES.register(name)(Stage(name, config, run))
        return run

    return deco


_loaded = False


def load_stages() -> Registry[Stage]:
    """The stage registry, with every built-in stage and every installed plugin loaded."""
    global _loaded
    if not _loaded:
        builtin = importlib.import_module(BUILTIN)  # by name: the recipes are plugins, found, not depended on
        for module in pkgutil.iter_modules(builtin.__path__):
            importlib.import_module(f"{BUILTIN}.{module.name}")
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                importlib.import_module(ep.value.partition(":")[0])
            except Exception as e:
                raise UserError(f"stage plugin {ep.name!r} ({ep.value}) cannot be imported: "
                                f"{type(e).__name__}: {e}") from e
        _loaded = True
    return STAGES
