"""Rows of a user's data file, whatever its format: JSONL (read here, errors name file:line), or through Hugging
Face `datasets` a Parquet, CSV or JSON file, or a directory written by `Dataset.save_to_disk` (pip install
datasets). A column mapping renames the file's columns to the names posttrain reads:

    data_columns = { prompt = "question", completion = "response" }   # posttrain name = the file's column

Rows come with a location for error messages: "file.jsonl:12" or "file.parquet row 12".
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from posttrain.data.jsonl import json_objects
from posttrain.errors import MissingExtraError, UserError

DATASET_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}


def read_rows(path: Path, columns: Mapping[str, str] | None = None, *, what: str = "data") -> Iterator[
        tuple[str, int, dict[str, Any]]]:
    """(location, 1-based row number, row) of every row, with `columns` applied (ours -> theirs)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what}={str(path)!r}: file not found")
    if path.is_file() and path.suffix == ".jsonl":
        rows: Iterator[tuple[str, int, dict[str, Any]]] = (
            (f"{path}:{n}", n, row) for n, row in json_objects(path))
    elif path.is_dir() or path.suffix in DATASET_SUFFIXES:
        rows = _dataset_rows(path, what)
    else:
        raise UserError(f"{what}={str(path)!r}: expected .jsonl, {', '.join(DATASET_SUFFIXES)} or a directory saved "
                        "by datasets' save_to_disk")
    first = True
    for where, n, row in rows:
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


def _dataset_rows(path: Path, what: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise MissingExtraError(f"{what}={str(path)!r}: reading {path.suffix or 'a dataset directory'} needs "
                                "Hugging Face datasets: pip install datasets (or posttrain[data])") from None
    datasets.disable_progress_bars()  # one file read is not long work; the run's own progress lines stay clean
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if "train" not in data:
                    raise UserError(f"{what}={str(path)!r}: a DatasetDict without a 'train' split (has "
                                    f"{sorted(data)}); save the split to use")
                data = data["train"]
        elif path.suffix == ".csv":  # every cell as written: "007" stays "007", 12 is "12", an empty cell ""
            with path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            features = datasets.Features({name: datasets.Value("string") for name in header})
            data = datasets.load_dataset("csv", data_files=str(path), split="train", features=features,
                                         keep_default_na=False)
        else:
            data = datasets.load_dataset(DATASET_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the file and the reason
        raise UserError(f"{what}={str(path)!r}: cannot read it with datasets ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None
    for i, row in enumerate(data, start=1):
        yield f"{path} row {i}", i, dict(row)
