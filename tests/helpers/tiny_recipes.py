"""One tiny recipe for the tests that need a real but short run: SFT of the tiny-test model on 1-digit additions,
2 steps of 4 examples, one thread, a 2-problem evaluation and no start-of-run evaluation. A test changes only what
it is about, section by section:

    validate(tiny_recipe(output_dir=str(tmp_path), checkpoint={"every": 1}), "test")   # a config
    write_recipe(tmp_path / "t.toml", tiny_recipe(sft={"steps": 100_000}))              # a file for the CLI
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


def tiny_recipe(**changes: Any) -> dict[str, Any]:
    """TINY_SFT with `changes`: a table (dict) updates that section key by key, anything else replaces the key;
    None removes it."""
    recipe = copy.deepcopy(TINY_SFT)
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
