"""Hostile data files: every format (JSONL, CSV, JSON, Parquet, a saved dataset) caps a row at the same 1 MiB and
rejects the same bad cells, each as one line naming the file and row (exit 2 from the CLI); answers that are not
text or integers (NaN, true, 2.5, null) are errors, not the answers "nan" or "True"; a lone surrogate names its
file:line instead of failing in the tokenizer."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.data.jsonl import MAX_ROW_BYTES
from posttrain.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
BIG = "x" * (MAX_ROW_BYTES + 1)
ROWS = [{"prompt": "1+1=", "answer": "2"}, {"prompt": BIG, "answer": "3"}, {"prompt": "2+2=", "answer": "4"}]


def posttrain(*args):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          check=False, cwd=ROOT, timeout=600)


def one_line(proc) -> str:
    """The error line of a run that failed as a user error: exit 2, one `error:` line, no traceback (other lines,
    such as the note that the checkout has uncommitted changes, are not the error)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def write(path: Path, rows: list[dict]) -> Path:
    """The rows in the format the suffix names (a directory: datasets' save_to_disk)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


# ---- one row cap for every format ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "where"), [("t.jsonl", "t.jsonl:2"), ("t.json", "t.json row 2"),
                                              ("t.csv", "t.csv row 2"), ("t.parquet", "t.parquet row 2"),
                                              ("saved", "saved row 2")])
def test_a_row_over_the_cap_names_file_and_row_in_every_format(tmp_path, name, where):
    from posttrain.envs.jsonl import read_tasks

    path = write(tmp_path / name, ROWS)
    with pytest.raises(UserError, match=rf"{where}: a (row|line) of more than 1,048,576 bytes \(the limit\)"):
        read_tasks(path)
    small = write(tmp_path / f"small{path.suffix}", [ROWS[0], ROWS[2]])
    assert [t.answer for _, t in read_tasks(small)] == ["2", "4"]


def test_a_20mb_parquet_cell_exits_2_naming_file_and_row(tmp_path):
    """The issue: a 20 MB cell aborted the trainer (SIGABRT) long after the file was read."""
    tasks = write(tmp_path / "tasks.parquet", [ROWS[0], {"prompt": "y" * (20 << 20), "answer": "1"}])
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'recipe = "sft"\nname = "t"\noutput_dir = "{tmp_path / "out"}"\n[model]\npath = "tiny-test"\n'
                      f'[env]\nname = "jsonl"\nargs = {{ path = "{tasks}" }}\n')
    line = one_line(posttrain("run", recipe))
    assert f"{tasks} row 2: a row of more than 1,048,576 bytes" in line and "'prompt'" in line


def test_parquet_metadata_refuses_a_huge_column_chunk_before_decoding_it(tmp_path, monkeypatch):
    """A chunk the metadata proves over the cap, and too big to decode to find the row, is never decompressed (a
    small file can hold gigabytes of one repeated byte); the error names the rows its row group holds."""
    import pyarrow.parquet as pq

    from posttrain.data import tables
    from posttrain.data.sft import read_pairs

    huge = "x" * (4 * MAX_ROW_BYTES)  # the metadata proves a row over the cap: 4 MiB in a column of 2 rows
    path = write(tmp_path / "bomb.parquet", [{"prompt": "a", "completion": "b"}, {"prompt": huge, "completion": "c"}])
    assert path.stat().st_size < MAX_ROW_BYTES  # compressed: the file is small, its cell is not
    monkeypatch.setattr(tables, "_PARQUET_DECODE_BYTES", 0)

    def decode(*args, **kwargs):
        raise AssertionError("decoded a column chunk its metadata already refuses")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", decode)
    with pytest.raises(UserError, match=r"bomb.parquet rows 1-2: a row of more than 1,048,576 bytes \(the limit\): "
                                        r"column 'prompt' holds [\d,]+ bytes for 2 rows"):
        read_pairs(path)


def test_csv_reads_cells_up_to_the_cap_and_leaves_the_csv_modules_limit_alone(tmp_path):
    from posttrain.data.sft import read_pairs

    limit = csv.field_size_limit()
    cell = "z" * (MAX_ROW_BYTES // 2)  # over csv's own default of 128 KiB, under the row cap
    path = write(tmp_path / "d.csv", [{"prompt": "multi\nline, \"quoted\"", "completion": cell}])
    assert [(p, c) for _, p, c in read_pairs(path)] == [("multi\nline, \"quoted\"", cell)]
    assert csv.field_size_limit() == limit
    # a record over the cap, whether one physical line or a quoted cell of many short lines
    lines = "prompt,completion\na,b\n\"" + "w\n" * (MAX_ROW_BYTES // 2 + 1) + '",c\n'
    (tmp_path / "lines.csv").write_text(lines)
    with pytest.raises(UserError, match=r"lines.csv row 2: a row of more than 1,048,576 bytes"):
        read_pairs(tmp_path / "lines.csv")
    assert csv.field_size_limit() == limit


def test_a_cell_that_is_not_utf8_or_not_csv_names_its_row(tmp_path):
    from posttrain.data.sft import read_pairs

    (tmp_path / "bytes.csv").write_bytes(b"prompt,completion\na,b\nc,\xff\n")
    with pytest.raises(UserError, match=r"bytes.csv row 2: not UTF-8 text"):
        read_pairs(tmp_path / "bytes.csv")
    (tmp_path / "wide.csv").write_text("prompt,completion\na,b,c\n")
    with pytest.raises(UserError, match=r"wide.csv row 1: 3 cells, more than the header's 2"):
        read_pairs(tmp_path / "wide.csv")


def test_json_arrays_are_read_one_row_at_a_time(tmp_path):
    from posttrain.data.sft import read_pairs

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    assert [(p, c) for _, p, c in read_pairs(write(tmp_path / "ok.json", rows))] == [
        (r["prompt"], r["completion"]) for r in rows]
    for text, message in [('[{"prompt": "a", "completion": "b"}, 3]', "row 2: expected a JSON object, got int"),
                          ('[{"prompt": "a", "completion": "b"},', "row 2: invalid JSON"),
                          ('[{"prompt": "a", "completion": "b"}] []', "text after the JSON array ends"),
                          ('[{"prompt": "a", "completion": "b"} {}]', "row 1: invalid JSON \\(expected ','")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(UserError, match=rf"bad.json:? ?{message}"):
            read_pairs(tmp_path / "bad.json")


# ---- answers: a string or an integer ---------------------------------------------------------------------------

@pytest.mark.parametrize("answer", [float("nan"), True, False, 2.5, None, [1], {"a": 1}])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_an_answer_that_is_not_a_string_or_an_integer_names_file_and_row(tmp_path, suffix, answer):
    from posttrain.envs.jsonl import read_tasks

    path = write(tmp_path / f"t{suffix}", [{"prompt": "a", "answer": answer}])  # one row: a column has one type
    where = "t.jsonl:1" if suffix == ".jsonl" else "t.parquet row 1"
    with pytest.raises(UserError, match=rf"{where}: 'answer' must be a string or an integer, got"):
        read_tasks(path)


def test_integer_answers_are_their_decimal_text_in_every_format(tmp_path):
    from posttrain.envs.jsonl import read_tasks

    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "answer": 7}\n{"prompt": "b", "answer": -12}\n')
    assert [t.answer for _, t in read_tasks(tmp_path / "t.jsonl")] == ["7", "-12"]
    # a float column holding whole numbers (pandas writes an int column with a gap as float64)
    path = write(tmp_path / "f.parquet", [{"prompt": "a", "answer": 7.0}, {"prompt": "b", "answer": -12.0}])
    assert [t.answer for _, t in read_tasks(path)] == ["7", "-12"]


def test_csv_cells_are_answers_as_written_and_an_empty_one_is_an_error(tmp_path):
    """CSV has no NaN or true: a cell is its text, so "NaN", "true" and "007" are those answers exactly; a missing
    value (pandas writes NaN as an empty cell) is an error naming the row."""
    from posttrain.envs.jsonl import read_tasks

    (tmp_path / "t.csv").write_text("prompt,answer\na,NaN\nb,true\nc,007\n")
    assert [t.answer for _, t in read_tasks(tmp_path / "t.csv")] == ["NaN", "true", "007"]
    (tmp_path / "gap.csv").write_text("prompt,answer\na,1\nb,\n")
    with pytest.raises(UserError, match=r"gap.csv row 2: 'answer' is empty"):
        read_tasks(tmp_path / "gap.csv")
    (tmp_path / "short.csv").write_text("prompt,answer\na,1\nb\n")
    with pytest.raises(UserError, match=r"short.csv row 2: 'answer' must be a string or an integer, got NoneType"):
        read_tasks(tmp_path / "short.csv")


# ---- lone surrogates -------------------------------------------------------------------------------------------

def test_a_lone_surrogate_in_a_task_prompt_names_file_and_line(tmp_path):
    from posttrain.envs.jsonl import read_tasks

    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b\\ud800", "answer": "2"}\n')
    with pytest.raises(UserError, match=r"t.jsonl:2: column 'prompt' holds a lone surrogate \('\\ud800'"):
        read_tasks(tmp_path / "t.jsonl")
    (tmp_path / "t.json").write_text('[{"prompt": "a", "answer": "\\udfff"}]')
    with pytest.raises(UserError, match=r"t.json row 1: column 'answer' holds a lone surrogate"):
        read_tasks(tmp_path / "t.json")


def test_a_lone_surrogate_in_an_sft_completion_exits_2_naming_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n'
                    '{"prompt": [{"role": "user", "content": "c"}], "completion": "d\\udc00"}\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'recipe = "sft"\nname = "t"\noutput_dir = "{tmp_path / "out"}"\n[model]\npath = "tiny-test"\n'
                      f'[sft]\ndata_path = "{data}"\n')
    line = one_line(posttrain("run", recipe))
    assert f"{data}:2: column 'completion' holds a lone surrogate" in line
