"""Named presets of the stage sections: `preset = "dapo"` in [rl] reads presets/rl/dapo.toml, whose keys become
that section's defaults; the recipe's own keys override them. One loader and one merge rule for every section that
has presets ([rl], [dpo]): a section adds presets by adding the `PresetKeys` mixin and a folder presets/<section>/.

Merge rule: the recipe's keys over the preset's. A hyperparameter table (`loss_args`) merges key by key while the
recipe keeps the preset's entry (`loss`); a recipe that picks another entry drops the preset's table for it (its
keys would not fit). `preset_overrides` records the keys where the recipe departs from the preset, so a run
labelled with a preset says so (the run log names them at start).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field, model_validator

from posttrain.errors import ConfigError

ROOT = Path(__file__).resolve().parent


def names(section: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / section).glob("*.toml"))


def load(section: str, name: str) -> dict[str, Any]:
    path = ROOT / section / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"{section}.preset", f"{name!r} is not a known preset; known: {', '.join(names(section))}")
    with path.open("rb") as f:
        return tomllib.load(f)


def overrides(preset: dict[str, Any], section: dict[str, Any]) -> list[str]:
    """The recipe's keys that differ from the preset's: 'group_filter: dynamic_sampling -> zero_variance'."""
    out = []
    for key, value in section.items():
        if key in ("preset", "preset_overrides") or key not in preset:
            continue
        if isinstance(value, dict) and isinstance(preset[key], dict):
            out += [f"{key}.{k}: {preset[key].get(k)!r} -> {v!r}" for k, v in value.items()
                    if k in preset[key] and preset[key][k] != v]
        elif value != preset[key]:
            out.append(f"{key}: {preset[key]!r} -> {value!r}")
    return out


def merge(preset: dict[str, Any], section: dict[str, Any], entry_tables: dict[str, str]) -> dict[str, Any]:
    """The recipe's keys over the preset's (module docstring); `entry_tables`: entry key -> its table's key."""
    merged = {**preset, **section}
    for entry, table in entry_tables.items():
        if table in preset and table in section and merged.get(entry) == preset.get(entry):
            merged[table] = {**preset[table], **section[table]}
        elif table in preset and table not in section and merged.get(entry) != preset.get(entry):
            del merged[table]
    return merged


class PresetKeys(BaseModel):
    """A section with presets: it declares `preset` (its description names them), its folder under presets/ and
    its entry -> table keys; this adds `preset_overrides` and the merge at load time."""

    preset_section: ClassVar[str]
    preset_entry_tables: ClassVar[dict[str, str]]

    preset_overrides: list[str] = Field(default_factory=list, description="Written by posttrain, not read: the "
                                        "keys this recipe sets to something other than its preset's value (the run "
                                        "log names them at start), so a run labelled with a preset says where it "
                                        "departs from it.")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if k != "preset_overrides"}  # recomputed, never taken as input
        if data.get("preset"):
            preset = load(cls.preset_section, data["preset"])
            data = {**merge(preset, data, cls.preset_entry_tables), "preset_overrides": overrides(preset, data)}
        return data
