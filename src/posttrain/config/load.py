"""Reading a recipe: the TOML file, its relative paths resolved against its own directory, the `--set` overrides,
validation into a RunConfig (config/schema.py) with errors naming the key and the file, and the resolved config
written back as TOML (config.toml of a run directory).
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from posttrain.config.schema import RunConfig, _first_error
from posttrain.errors import ConfigError, UserError


def parse_override(text: str) -> tuple[list[str], Any]:
    """'rl.lr=1e-4' -> (['rl', 'lr'], 1e-4). The value is read as a TOML value, else as a plain string; `null`
    (TOML has none) unsets an optional key: 'sft.stop_at_accuracy=null' (quote it for the string: 'x="null"')."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected section.key=value")
    if raw.strip() == "null":
        return key.strip().split("."), None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def set_path(tree: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {'.'.join(path)}: {part!r} is not a section")
        tree = node
    tree[path[-1]] = value


# Forces model.bf16 for every recipe this process validates: to check a result in the other precision without
# editing recipes (the test suite runs its precision-marked tests under both values).
FORCE_BF16 = "POSTTRAIN_BF16"


def _forced_bf16(raw: dict[str, Any]) -> dict[str, Any]:
    value = os.environ.get(FORCE_BF16, "").strip().lower()
    if not value:
        return raw
    choices = {"true": True, "1": True, "false": False, "0": False, "auto": "auto"}
    if value not in choices:
        raise UserError(f"{FORCE_BF16}={value!r}: expected true, false or auto")
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    return {**raw, "model": {**model, "bf16": choices[value]}}


def validate(raw: dict[str, Any], source: str = "<recipe>") -> RunConfig:
    try:
        return RunConfig.model_validate(copy.deepcopy(_forced_bf16(raw)))
    except ValidationError as e:
        key, msg = _first_error(e)
        raise UserError(f"{source}: {key}: {msg}") from None
    except ConfigError as e:
        raise UserError(f"{source}: {e.key}: {e.message}") from None


def read_toml(path: Path, *, missing: str) -> dict[str, Any]:
    """A TOML file as a dict; `missing` is the message when it does not exist, bad TOML names the file."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(missing) from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None


_FILE_IMPORT = re.compile(r"^(?P<file>[^:]+\.py):(?P<attr>[A-Za-z_][A-Za-z0-9_.]*)$")


def is_path_key(key: str) -> bool:
    """The recipe keys that hold file system paths: `path`, and every key ending in _path, _dir or _file."""
    return key == "path" or key.endswith(("_path", "_dir", "_file"))


def resolve_paths(tree: Any, base: Path, *, section: tuple[str, ...] = ()) -> Any:
    """A recipe's relative paths made absolute against `base`, the directory of the file that wrote them: values of
    path keys (is_path_key), and the file of an import path 'dir/file.py:Name' in any string. model.path and
    teacher.path are paths only when they name something that exists there (else it is a preset name, or an error later)."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            where = (*section, str(key))
            if isinstance(value, str) and is_path_key(str(key)):
                candidate = base / Path(value).expanduser()
                model_path = where in (("model", "path"), ("teacher", "path"))  # or a preset's name
                out[key] = value if (model_path and not candidate.exists()) else _absolute(value, base)
            else:
                out[key] = resolve_paths(value, base, section=where)
        return out
    if isinstance(tree, list):
        return [resolve_paths(v, base, section=section) for v in tree]
    if isinstance(tree, str) and (m := _FILE_IMPORT.match(tree)):
        return f"{_absolute(m['file'], base)}:{m['attr']}"
    return tree


def _absolute(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return str(path) if path.is_absolute() else os.path.normpath(base.resolve() / path)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The recipe file validated, its relative paths resolved against its own directory (resolve_paths); the
    --set overrides are applied after, as typed on the command line (relative to the working directory)."""
    path = Path(path)
    raw = resolve_paths(read_toml(path, missing=f"{path}: recipe file not found"), path.parent)
    raw.setdefault("name", path.stem)
    for text in overrides or []:
        key, value = parse_override(text)
        set_path(raw, key, value)
    return validate(raw, str(path))


def to_toml(cfg: RunConfig) -> str:
    """The resolved config (every default filled in) as TOML."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    lines: list[str] = []
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for k, v in top.items():
        lines.append(f"{k} = {_toml_value(v)}")
    for section, body in data.items():
        if not isinstance(body, dict):
            continue
        lines.append(f"\n[{section}]")
        for k, v in body.items():
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # TOML has no null: a None entry is left out (it reads back as its default, None)
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    return repr(v)
