"""Two tiny recipes for the tests that need a real but short run, so no test re-types one. A test changes only
what it is about, section by section:

    validate(tiny_recipe(output_dir=str(tmp_path), checkpoint={"every": 1}), "test")   # a config
    write_recipe(tmp_path / "t.toml", tiny_recipe(sft={"steps": 100_000}))              # a file for the CLI
    write_recipe(tmp_path / "t.toml", tiny_sft_rl(rl={"steps": 3}, tracking={...}))     # the SFT -> RL pipeline

`tiny_recipe`: SFT of the tiny-test model on 1-digit additions, 2 steps of 4 examples, one thread, a 2-problem
evaluation and no start-of-run evaluation. `tiny_sft_rl`: the quickstart's two stages at toy size (2 SFT steps of
8, 2 RL steps of 2x2, a checkpoint every step, a 3-problem evaluation with the start-of-run one), for the tests of
what a whole run does: the CLI, tracking, crash and resume.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from posttrain.config.load import _toml_value

TINY_SFT: dict[str, Any] = {
    "recipe": "sft", "name": "t", "threads": 1,
    "model": {"path": "tiny-test"},
    "env": {"name": "arithmetic", "args": {"digits": 1}},
    "sft": {"steps": 2, "batch_size": 4, "micro_batch_size": 4},
    "eval": {"problems": 2, "samples": 1, "ks": [1], "max_new_tokens": 2, "at_start": False},
}


TINY_SFT_RL: dict[str, Any] = {
    "recipe": ["sft", "rl"], "name": "tiny", "seed": 0, "threads": 1,
    "model": {"path": "tiny-test"},
    "env": {"name": "arithmetic", "args": {"digits": 1}},
    "sft": {"steps": 2, "batch_size": 8, "micro_batch_size": 8},
    "rl": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3},
    "eval": {"problems": 3, "samples": 2, "ks": [1, 2], "max_new_tokens": 3},
    "checkpoint": {"every": 1},
}


def tiny_recipe(**changes: Any) -> dict[str, Any]:
    """TINY_SFT with `changes`: a table (dict) updates that section key by key, anything else replaces the key;
    None removes it."""
    return changed(TINY_SFT, changes)


def tiny_sft_rl(**changes: Any) -> dict[str, Any]:
    """TINY_SFT_RL with `changes`, as in tiny_recipe."""
    return changed(TINY_SFT_RL, changes)


def changed(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    recipe = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            recipe.pop(key, None)
        elif isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    """The recipe as a TOML file at `path` (top-level keys first, then one table per section) -> path."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in recipe.items() if not isinstance(v, dict)]
    for section, body in recipe.items():
        if isinstance(body, dict):
            lines += [f"[{section}]", *(f"{k} = {_toml_value(v)}" for k, v in body.items())]
    path.write_text("\n".join(lines) + "\n")
    return path
