"""Stages as plugins: a stage is a name, its config section and its run function, registered by its own file.

    @register_stage("sft", SFTConfig, state=Cursor)    # in recipes/sft.py: the whole registration
    def run(ctx: RunContext, cfg: SFTConfig, resume: StageResume | None) -> None: ...  # runtime/loop.StageLoop

`recipe = ["sft", "rl"]` names registered stages; each named stage's TOML section (`[rl]`) is validated by its
config class, and a section exists only for a stage the recipe uses; `state` is the frozen dataclass its
checkpoints hold (read back into `resume.state`). The built-in stages are the modules in BUILTIN_MODULES, each
registering itself when imported, on the registry's first lookup; an installed package adds stages through the
entry-point group `posttrain.stages` (each entry point is a module to import). Adding a stage is one new file in
recipes/ (its method only: runtime/loop.py is the skeleton), its line in BUILTIN_MODULES and its test.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Self

from posttrain.registry import Registry

ENTRY_POINT_GROUP = "posttrain.stages"


@dataclass(frozen=True)
class StageState:
    """A stage's resumable state besides its learner; saved as the checkpoint's `stage` table (plain data)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: weights are not copied

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Raises ValueError naming the keys that are missing or not this stage's (a hand-edited checkpoint)."""
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data))
        if unknown or missing:
            raise ValueError(f"expected the keys {sorted(names)}"
                             + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else ""))
        return cls(**data)


@dataclass(frozen=True)
class Cursor(StageState):
    """The state of a stage that reads its data in order: how many examples (or sequences) it has consumed."""

    cursor: int = 0


@dataclass(frozen=True)
class StageResume:
    """What a stage gets back from a checkpoint written in the middle of it."""

    stage_step: int  # steps of this stage already done
    learner: dict[str, Any] | None  # Learner.state_dict()
    state: Any = None  # the stage's StageState


@dataclass(frozen=True)
class Stage:
    name: str
    config: type  # a config.Section subclass: the stage's TOML section
    run: Callable[..., None]  # run(ctx, cfg, resume: StageResume | None)
    state: type[StageState] = StageState  # what its checkpoints hold besides the learner

    @property
    def doc(self) -> str:
        return (self.run.__module__ and importlib.import_module(self.run.__module__).__doc__ or "").strip()


# The built-in stages: modules that register themselves when imported, on the registry's first lookup.
BUILTIN_MODULES = tuple(f"posttrain.recipes.{m}" for m in ("sft", "rl", "dpo", "rlp", "pretrain", "opd_offline"))
STAGES: Registry[Stage] = Registry("stage", builtin_modules=BUILTIN_MODULES, entry_point_group=ENTRY_POINT_GROUP)


def register_stage(name: str, config: type, *,
                   state: type[StageState] = StageState) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def deco(run: Callable[..., None]) -> Callable[..., None]:
        STAGES.register(name)(Stage(name, config, run, state))
        return run

    return deco


def load_stages() -> Registry[Stage]:
    """The stage registry (its built-ins and installed plugins are imported on its first lookup)."""
    return STAGES
