"""Reading JSONL files whose every line must be a JSON object, and the check every row of a data file passes
whatever its format (data/tables.py); errors name the file and line (or row)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

MAX_ROW_BYTES = 1 << 20  # one record of a dataset (a JSONL line, a CSV record, a Parquet row); more is a broken file
MAX_LINE_BYTES = MAX_ROW_BYTES


def check_row(where: str, row: dict[str, Any]) -> dict[str, Any]:
    """The row, if its text (strings, bytes, column names, nested values) is at most MAX_ROW_BYTES as UTF-8 and
    holds no lone surrogate (a JSON escape like "\\ud800" decodes to one; no tokenizer or file can take it).
    Otherwise a UserError naming `where` and the column. Walked without recursion: a value nested as deeply as
    the JSON parser allows still fits."""
    total = 0
    for column, value in row.items():
        size, stack = 0, [column, value]
        while stack and total + size <= MAX_ROW_BYTES:
            v = stack.pop()
            if isinstance(v, str):
                if len(v) > MAX_ROW_BYTES:  # at least that many bytes: no need to encode it to know
                    size += len(v)
                    continue
                try:
                    size += len(v.encode("utf-8"))
                except UnicodeEncodeError as e:
                    raise UserError(f"{where}: column {column!r} holds a lone surrogate ({v[e.start]!r} at "
                                    f"character {e.start} of a string), which is not Unicode text") from None
            elif isinstance(v, bytes | bytearray):
                size += len(v)
            elif isinstance(v, dict):
                stack.extend(k for kv in v.items() for k in kv)
            elif isinstance(v, list | tuple):
                stack.extend(v)
            else:  # a number, bool, None, date: counted as one byte, so a long list of them is capped too
                size += 1
        total += size
        if total > MAX_ROW_BYTES:
            raise UserError(f"{where}: a row of more than {MAX_ROW_BYTES:,} bytes (the limit); column {column!r} "
                            f"alone holds {'at least ' if stack else ''}{size:,}")
    return row


def json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of the file. Every way a line can be unusable (not UTF-8,
    longer than MAX_LINE_BYTES, not JSON, nested too deeply, a number too long to convert, not an object, a lone
    surrogate: check_row) is a UserError naming file:line. Lines are read as bytes and decoded one by one, so an
    error names its own line and a huge line is never held whole in memory."""
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
            yield lineno, check_row(where, row)
