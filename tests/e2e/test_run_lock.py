"""A run directory has one writer: a second `posttrain run` on a live run is one line naming the owner, and the lock
of an owner that died (SIGKILL) is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_recipes import tiny_recipe, write_recipe

from posttrain import rundir
from posttrain.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
HOLD = ("import sys, time\nfrom pathlib import Path\nfrom posttrain.rundir import owned\n"
        "with owned(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n")


def hold_in_another_process(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_told_who_owns_the_directory(tmp_path):
    run_dir = tmp_path / "run"
    owner = hold_in_another_process(run_dir)
    try:
        with pytest.raises(UserError) as e, rundir.owned(run_dir):
            pass
        message = str(e.value)
        assert f"pid {owner.pid}" in message and str(run_dir) in message and "\n" not in message
    finally:
        owner.kill()
        owner.wait()
    with rundir.owned(run_dir):  # the kernel dropped the dead owner's lock: taken over
        info = json.loads(rundir.lock_path(run_dir).read_text())
        assert info["pid"] == os.getpid()


def test_the_lock_lives_beside_the_directory_so_fresh_cannot_drop_it(tmp_path):
    run_dir = tmp_path / "run"
    with rundir.owned(run_dir):
        assert rundir.lock_path(run_dir).parent == tmp_path
        assert not run_dir.exists()  # taking the lock creates nothing inside


def _recipe(tmp_path: Path, steps: int) -> Path:
    return write_recipe(tmp_path / "t.toml", tiny_recipe(output_dir=str(tmp_path), sft={"steps": steps},
                                                         checkpoint={"every": 0}))


def _wait_for_training(run_dir: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300  # a safety net only: the condition is the first logged step
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip():
            return
        time.sleep(0.2)
    raise AssertionError(f"the first run did not start training: {proc.poll()}")


def test_a_second_posttrain_run_on_a_live_run_is_one_line_and_a_killed_owner_is_taken_over(tmp_path):
    recipe = _recipe(tmp_path, steps=100000)
    run_dir = tmp_path / "t"
    first = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_training(run_dir, first)
        for extra in ([], ["--fresh"]):
            second = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe), *extra], cwd=ROOT,
                                    capture_output=True, text=True, timeout=300, check=False)
            assert second.returncode == 2, second.stderr
            errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and f"pid {first.pid}" in errors[0] and "in use" in errors[0], second.stderr
            assert (run_dir / "metrics.jsonl").exists(), "--fresh of a live run deleted it"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    short = _recipe(tmp_path, steps=3)
    third = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(short), "--fresh"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, check=False)
    assert third.returncode == 0, third.stderr
    assert (run_dir / "final").is_dir()
