"""What a benchmark prints about where it ran: the CPU's model name and the code's commit."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """lscpu's "Model name" (e.g. "AMD EPYC"), else what platform knows."""
    try:
        lines = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines()
    except OSError:
        lines = []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "")
    return name or platform.processor() or "unknown"


def commit() -> str:
    """The short commit, marked when src/ has uncommitted changes (the figures are then not that commit's)."""
    git = ["git", "-C", str(ROOT)]
    try:
        code = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "src"], check=False, capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (code or "unknown") + (" (src modified)" if dirty else "")
