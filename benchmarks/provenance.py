"""What a benchmark prints about where it ran: the CPU's model name, the code's commit, and the machine's dense
matmul rate (the ceiling the benchmarks state their speeds against)."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

import torch

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


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """The best of `repeats` n x n x n matmuls in `dtype`, GFLOP/s, with the threads torch uses now."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up (oneDNN kernel selection, page faults)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
