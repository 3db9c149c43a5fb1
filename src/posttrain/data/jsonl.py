"""Reading JSONL files whose every line must be a JSON object; errors name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

MAX_LINE_BYTES = 1 << 20  # one record of a dataset; a longer line is a broken file, not data


def json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of the file. Every way a line can be unusable (not UTF-8,
    longer than MAX_LINE_BYTES, not JSON, nested too deeply, a number too long to convert, not an object) is a
    UserError naming file:line. Lines are read as bytes and decoded one by one, so an error names its own line
    and a huge line is never held whole in memory."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES:
                raise UserError(f"{where}: a line of more than {MAX_LINE_BYTES:,} bytes (the limit)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise UserError(f"{where}: JSON nested too deeply to read") from None
            except ValueError as e:  # e.g. an integer of more than 4300 digits
                raise UserError(f"{where}: unreadable JSON value ({str(e)[:120]})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row
