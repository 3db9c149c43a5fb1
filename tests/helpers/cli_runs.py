"""A real `posttrain run` in a subprocess, optionally killed by a fault (POSTTRAIN_FAULT), and its metrics without
the timings: what the crash-resume tests of every stage compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def posttrain_run(recipe: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("POSTTRAIN_FAULT", None)
    if fault:
        env["POSTTRAIN_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--set", f"output_dir={out}"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, check=False)


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows without time/ and perf/ keys (the only ones a repeated run may change)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]
