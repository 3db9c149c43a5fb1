"""Rows of a user's data file, whatever its format: JSONL, CSV, or JSON (a JSON array of objects, or JSON Lines),
read here with nothing to install; Parquet through pyarrow, and a `.arrow` file or a directory written by
`Dataset.save_to_disk` through Hugging Face `datasets` (pip install datasets; it brings pyarrow). A column mapping
renames the file's columns to the names posttrain reads:

    data_columns = { prompt = "question", completion = "response" }   # posttrain name = the file's column

Rows come with a location for error messages: "file.jsonl:12" (a line) or "file.parquet row 12". Every row of
every format passes data/jsonl.py's check_row: at most MAX_ROW_BYTES (1 MiB) of text, no lone surrogate; a row
over the limit is an error naming file and row, raised as the row is reached (JSONL, CSV and JSON read a row at
a time, Parquet 64 rows at a time, after a look at the file's metadata). A CSV cell is the text
as written ("007" stays "007", 12 is "12", an empty cell is "", a missing trailing cell is None).
"""

from __future__ import annotations

import csv
import importlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from posttrain.data.jsonl import MAX_ROW_BYTES, check_row, json_objects
from posttrain.errors import MissingExtraError, UserError

DATASET_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}
Rows = Iterator[tuple[str, int, dict[str, Any]]]
FORMATS = ("a .jsonl file, or through Hugging Face datasets a .parquet/.csv/.json file or a save_to_disk directory "
           "(relative to the recipe file)")


def data_path_field(rows: str, *, unset: str | None) -> Any:
    """The `data_path` key of a stage that reads a data file: `rows` says what a row holds, `unset` what the stage
    does without a file (None: the key is required)."""
    if unset is None:
        return Field(description=f"{rows}: {FORMATS}.")
    return Field(None, description=f"{rows}: {FORMATS}. Unset: {unset}")


def data_columns_field(names: str, example: str) -> Any:
    """The `data_columns` key beside it: the file's column names for posttrain's (`names`)."""
    return Field(default_factory=dict, description=f"The file's column names for {names}, e.g. {example}.")


_PARQUET_BATCH = 64  # rows decoded at a time: memory stays near 64 rows, each capped at MAX_ROW_BYTES
_PARQUET_DECODE_BYTES = 64 * MAX_ROW_BYTES  # a column chunk the metadata proves over the cap is refused unread above
_JSON_CHUNK = 1 << 16


def read_rows(path: Path, columns: Mapping[str, str] | None = None, *, what: str = "data") -> Rows:
    """(location, 1-based row number, row) of every row, with `columns` applied (ours -> theirs)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what}={str(path)!r}: file not found")
    if path.is_file() and path.suffix == ".jsonl":
        rows: Rows = ((f"{path}:{n}", n, row) for n, row in json_objects(path))
    elif path.is_file() and path.suffix == ".csv":
        rows = _csv_rows(path)
    elif path.is_file() and path.suffix == ".json":
        rows = _json_rows(path)
    elif path.is_file() and path.suffix == ".parquet":
        rows = _parquet_rows(path, what)
    elif path.is_dir() or path.suffix in DATASET_SUFFIXES:
        rows = _dataset_rows(path, what)
    else:
        raise UserError(f"{what}={str(path)!r}: expected .jsonl, {', '.join(DATASET_SUFFIXES)} or a directory saved "
                        "by datasets' save_to_disk")
    first = True
    for where, n, row in rows:
        row = check_row(where, row)  # the one cap and text check for every format (JSONL lines pass it twice)
        if columns:
            if first:
                missing = sorted(theirs for theirs in columns.values() if theirs not in row)
                if missing:
                    raise UserError(f"{where}: no column {missing[0]!r} (named in the column mapping); columns: "
                                    f"{sorted(row)}")
            row = {**{k: v for k, v in row.items() if k not in columns.values()},
                   **{ours: row.get(theirs) for ours, theirs in columns.items()}}
        first = False
        yield where, n, row


def _csv_rows(path: Path) -> Rows:
    """Records of a CSV file (header first), read a line at a time: a record of more than MAX_ROW_BYTES, or bytes
    that are not UTF-8, are errors naming the row before the rest is read."""
    n, size, header = 0, 0, None

    def where() -> str:
        return f"{path} row {n + 1}" if header is not None else f"{path} header"

    def lines() -> Iterator[str]:  # physical lines as text; csv.reader joins those of a quoted multi-line cell
        nonlocal size
        first = True
        while raw := f.readline(MAX_ROW_BYTES + 1):
            size += len(raw)
            if size > MAX_ROW_BYTES:
                raise UserError(f"{where()}: a row of more than {MAX_ROW_BYTES:,} bytes (the limit)")
            try:
                yield raw.decode("utf-8-sig" if first else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where()}: not UTF-8 text ({e.reason})") from None
            first = False

    try:
        f = path.open("rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        reader = csv.reader(lines())
        while True:
            size, limit = 0, csv.field_size_limit(MAX_ROW_BYTES)  # csv's own limit (128 KiB) is per process
            try:
                record = next(reader, None)
            except csv.Error as e:
                raise UserError(f"{where()}: not CSV ({e})") from None
            finally:
                csv.field_size_limit(limit)
            if record is None:
                return
            if not record:  # a blank line
                continue
            if header is None:
                header = record
                if len(set(header)) != len(header):
                    raise UserError(f"{path}: the header names a column twice: {header}")
                continue
            n += 1
            if len(record) > len(header):
                raise UserError(f"{path} row {n}: {len(record)} cells, more than the header's {len(header)}")
            yield f"{path} row {n}", n, dict(zip(header, record + [None] * (len(header) - len(record)), strict=True))


def _json_rows(path: Path) -> Rows:
    """A .json file: an array of objects, parsed one element at a time (so an element over MAX_ROW_BYTES is an
    error before the rest is read), or, like JSONL, one object a line."""
    try:
        with path.open("rb") as f:
            start = f.read(3).removeprefix(b"\xef\xbb\xbf")
            while (chunk := f.read(_JSON_CHUNK)) and not start.strip():
                start = chunk
            start = start.lstrip()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if not start.startswith(b"["):
        yield from ((f"{path}:{n}", n, row) for n, row in json_objects(path))
        return
    decoder, space, n = json.JSONDecoder(), re.compile(r"\s*"), 0
    with path.open(encoding="utf-8-sig") as f:
        buf, pos = "", 0

        def more() -> bool:
            """Appends the file's next chunk to the buffer (dropping what was parsed); False at its end."""
            nonlocal buf, pos
            try:
                chunk = f.read(_JSON_CHUNK)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} row {n + 1}: not UTF-8 text ({e.reason})") from None
            buf, pos = buf[pos:] + chunk, 0
            return bool(chunk)

        def token() -> str:
            """The next character that is not white space, left unread; "" at the end of the file."""
            nonlocal pos
            while True:
                pos = space.match(buf, pos).end()
                if pos < len(buf) or not more():
                    return buf[pos:pos + 1]

        token()
        pos += 1  # the '['
        closed = token() == "]"
        pos += closed
        while not closed:
            where = f"{path} row {n + 1}"
            while True:  # the element whole in the buffer, or the buffer past the cap
                try:
                    row, pos = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if len(buf) - pos > MAX_ROW_BYTES:
                        raise UserError(f"{where}: a row of more than {MAX_ROW_BYTES:,} bytes (the limit)") from None
                    if not more():
                        raise UserError(f"{where}: invalid JSON ({e.msg})") from None
                except RecursionError:
                    raise UserError(f"{where}: JSON nested too deeply to read") from None
                except ValueError as e:  # e.g. an integer of more than 4300 digits
                    raise UserError(f"{where}: unreadable JSON value ({str(e)[:120]})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            n += 1
            yield where, n, row
            after = token()
            if after not in (",", "]"):
                raise UserError(f"{where}: invalid JSON (expected ',' or ']' after the row, got "
                                f"{after or 'the end of the file'!r})")
            pos += 1
            closed = after == "]"
            if not closed:
                token()
        if token():
            raise UserError(f"{path}: text after the JSON array ends")


def _need(module: str, package: str, what: str, path: Path):
    try:
        return importlib.import_module(module)
    except ImportError:
        e = MissingExtraError(package, "data")
        e.args = (f"{what}={str(path)!r}: reading {path.suffix or 'a dataset directory'} needs {e}",)
        raise e from None


def _unreadable(where: str, reader: str, e: Exception) -> UserError:
    return UserError(f"{where}: cannot read it with {reader} ({type(e).__name__}: "
                     f"{(str(e).splitlines() or [''])[0][:200]})")


def _parquet_rows(path: Path, what: str) -> Rows:
    """Rows of a Parquet file, decoded _PARQUET_BATCH at a time. A column chunk whose size in the file's metadata
    proves a row over MAX_ROW_BYTES, and too big to decode and find which, is refused without decoding it."""
    pq = _need("pyarrow.parquet", "pyarrow", what, path)
    reader = "datasets' engine pyarrow"
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types; the user needs the file and the reason
        raise _unreadable(f"{what}={str(path)!r}", reader, e) from None
    meta, first = file.metadata, 1
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.total_uncompressed_size > max(_PARQUET_DECODE_BYTES, MAX_ROW_BYTES * group.num_rows):
                raise UserError(f"{path} rows {first}-{first + group.num_rows - 1}: a row of more than "
                                f"{MAX_ROW_BYTES:,} bytes (the limit): column {chunk.path_in_schema!r} holds "
                                f"{chunk.total_uncompressed_size:,} bytes for {group.num_rows} rows (the file's "
                                "metadata; not decoded)")
        first += group.num_rows
    batches, n = file.iter_batches(batch_size=_PARQUET_BATCH), 0
    while True:
        try:
            batch = next(batches, None)
            rows = [] if batch is None else batch.to_pylist()
        except Exception as e:  # noqa: BLE001 - e.g. bytes that are not UTF-8 in a string column
            raise _unreadable(f"{path} rows {n + 1}-{n + _PARQUET_BATCH}", reader, e) from None
        if batch is None:
            return
        for row in rows:
            n += 1
            yield f"{path} row {n}", n, row


def _dataset_rows(path: Path, what: str) -> Rows:
    datasets = _need("datasets", "datasets", what, path)
    datasets.disable_progress_bars()  # one file read is not long work; the run's own progress lines stay clean
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if "train" not in data:
                    raise UserError(f"{what}={str(path)!r}: a DatasetDict without a 'train' split (has "
                                    f"{sorted(data)}); save the split to use")
                data = data["train"]
        else:
            data = datasets.load_dataset(DATASET_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the file and the reason
        raise _unreadable(f"{what}={str(path)!r}", "datasets", e) from None
    for i, row in enumerate(data, start=1):  # memory-mapped Arrow: a row is read from disk as it is reached
        yield f"{path} row {i}", i, dict(row)
