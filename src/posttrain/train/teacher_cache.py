"""A teacher's logprobs of a fixed sample set, computed once and kept on disk (offline distillation).

The cache file records what it was computed from: a hash of the teacher's weights, a hash of the sample file, the
temperature and the number of rows. Loading checks all four, then recomputes a few rows with the teacher and
compares, so a cache can never silently stand in for another teacher, other samples or other numerics.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.errors import UserError
from posttrain.train.learner import FrozenModel, Sequences

SPOT_CHECK_ROWS = 8
SPOT_CHECK_ATOL = 1e-4  # fp32 logprobs of the same weights agree far closer; bf16 vs fp32 would not


def weights_hash(state: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def teacher_logprobs(path: Path, teacher: FrozenModel, seqs: Sequences, *, samples_file: Path,
                     temperature: float) -> tuple[list[Tensor], float, bool]:
    """-> (one (T_i,) logprob tensor per row, the teacher FLOPs the cache cost, whether it was computed now).
    An existing cache is used only if it was made from this teacher, these samples and this temperature."""
    fingerprint = {"teacher_weights": weights_hash(teacher.state_dict()), "samples": file_hash(samples_file),
                   "temperature": float(temperature), "rows": len(seqs)}
    if path.exists():
        try:
            cached: dict[str, Any] = torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem for the user
            raise UserError(f"{path}: not a readable teacher cache ({type(e).__name__}); delete it to recompute") from None
        differs = [f"{k} {cached['fingerprint'].get(k)!r} vs {v!r}" for k, v in fingerprint.items()
                   if cached["fingerprint"].get(k) != v]
        if differs:
            raise UserError(f"{path}: this teacher cache was computed from something else ({'; '.join(differs)}: "
                            "cache vs now); delete it to recompute, or point cache_path elsewhere")
        check = list(range(min(SPOT_CHECK_ROWS, len(seqs))))
        fresh, _ = teacher.logprobs(Sequences([seqs.prompts[i] for i in check], [seqs.completions[i] for i in check]),
                                    temperature=temperature)
        for i, lp in zip(check, fresh, strict=True):
            gap = float((lp - cached["logprobs"][i]).abs().max()) if lp.numel() else 0.0
            if gap > SPOT_CHECK_ATOL:
                raise UserError(f"{path}: row {i} of the cache differs from the teacher by {gap:.3g} (> "
                                f"{SPOT_CHECK_ATOL}); the teacher's numerics changed (bf16? another device?): "
                                "delete the cache to recompute")
        return list(cached["logprobs"]), float(cached["flops"]), False
    logprobs, flops = teacher.logprobs(seqs, temperature=temperature)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"fingerprint": fingerprint, "logprobs": logprobs, "flops": flops}, tmp)
    tmp.replace(path)
    return logprobs, flops, True
