"""Weights & Biases beside metrics.jsonl, offline (no network): the same rows, one W&B run kept across a resume."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_recipes import tiny_sft_rl, write_recipe

ROOT = Path(__file__).resolve().parents[2]

# 3 RL steps, so a crash at global step 4 lands in RL after a checkpoint
RECIPE = tiny_sft_rl(name="tracked", rl={"steps": 3},
                     tracking={"wandb": True, "wandb_mode": "offline", "wandb_project": "posttrain-test",
                               "wandb_tags": ["ci"]})


def _run(recipe: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "POSTTRAIN_FAULT"}
    if fault:
        env["POSTTRAIN_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], capture_output=True, text=True,
                          cwd=recipe.parent, env=env, timeout=600, check=False)


def _records(run_file: Path):
    """The records of a W&B run file: W&B's 7-byte header, then LevelDB-log records (crc32, length, type) in
    32 KiB blocks, a record split across blocks as FIRST/MIDDLE/LAST pieces."""
    data, block, at, pieces = run_file.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while at + 7 <= len(data):
        if block - at % block < 7:  # a block's tail too short for a header is padding
            at += block - at % block
            continue
        length, kind = struct.unpack("<HB", data[at + 4:at + 7])
        piece, at = data[at + 7:at + 7 + length], at + 7 + length
        if kind == 0:  # zero fill at the end of a file
            break
        pieces = piece if kind in (1, 2) else pieces + piece
        if kind in (1, 4):  # FULL or LAST
            yield pieces


def _logged_steps(run_file: Path) -> set[int]:
    from wandb.proto import wandb_internal_pb2

    steps = set()
    for data in _records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            steps |= {int(json.loads(i.value_json)) for i in record.history.item
                      if (i.key or "/".join(i.nested_key)) == "_step"}
    return steps


@pytest.mark.slow
def test_wandb_offline_gets_the_metrics_and_keeps_one_run_across_a_resume(tmp_path):
    pytest.importorskip("wandb", reason="the wandb extra is part of `make test`")
    recipe = write_recipe(tmp_path / "r.toml", RECIPE)
    run_dir = tmp_path / "runs" / "tracked"
    assert _run(recipe, fault="train:4").returncode == -9  # killed during the RL stage, after a checkpoint
    run_id = (run_dir / "wandb-id").read_text().strip()
    done = _run(recipe)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "wandb-id").read_text().strip() == run_id  # the resume continued the same W&B run

    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one per process, both of the same run id
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the resumed process re-sent what the killed one may not have flushed: its file alone holds the whole run
    assert _logged_steps(files[0]) < _logged_steps(files[-1])
    assert _logged_steps(files[-1]) == {r["step"] for r in rows} == set(range(6))
