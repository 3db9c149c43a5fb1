"""`model.bf16 = "auto"` is a decision about the machine: the run says what it chose and why, in run.log,
config.json and summary.json, so that a table of runs can tell fp32 rows from bf16 ones; and every metrics row says
how much memory the run held."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_recipes import tiny_recipe, write_recipe

from posttrain.models import bf16_is_fast

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("choice", ["auto", "true", "false"])
def test_the_resolved_precision_is_recorded_with_its_reason(tmp_path, choice):
    bf16 = {"auto": "auto", "true": True, "false": False}[choice]
    recipe = write_recipe(tmp_path / "t.toml", tiny_recipe(output_dir=str(tmp_path), model={"bf16": bf16}))
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    expected = bf16_is_fast(torch.device("cpu")) if choice == "auto" else choice == "true"
    resolved = "bf16" if expected else "fp32"
    run_dir = tmp_path / "t"
    precision = json.loads((run_dir / "config.json").read_text())["starts"][-1]["precision"]
    assert precision["resolved"] == resolved and precision["requested"] == {"auto": "auto", "true": True,
                                                                          "false": False}[choice]
    assert f"model.bf16 = {choice}" in precision["why"] and precision["cpu"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["precision"] == resolved and "cpu" in summary
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["perf/peak_rss_mb"] for r in rows]  # memory on every row: a peak never falls
    assert all(p > 0 for p in peaks) and peaks == sorted(peaks) and summary["peak_rss_mb"] >= peaks[-1]
    assert all(0 < r["perf/rss_mb"] <= r["perf/peak_rss_mb"] + 1 for r in rows)
    log = (run_dir / "run.log").read_text()
    assert f"precision: {'bf16 autocast' if expected else 'fp32'} (model.bf16 = {choice}" in log


def test_posttrain_bf16_forces_the_precision_of_every_recipe(monkeypatch):
    from posttrain.config import validate
    from posttrain.errors import UserError

    raw = {"recipe": "sft", "name": "t", "model": {"path": "tiny-test", "bf16": "auto"}, "env": {"name": "arithmetic"}}
    for value, expected in (("true", True), ("FALSE", False), ("auto", "auto"), ("1", True)):
        monkeypatch.setenv("POSTTRAIN_BF16", value)
        assert validate(raw).model.bf16 == expected
    monkeypatch.setenv("POSTTRAIN_BF16", "maybe")
    with pytest.raises(UserError, match="POSTTRAIN_BF16='maybe'"):
        validate(raw)
    monkeypatch.delenv("POSTTRAIN_BF16")
    assert validate(raw).model.bf16 == "auto"
