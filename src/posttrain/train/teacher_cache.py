"""A teacher's logprobs of a fixed sample set, computed once and kept on disk (offline distillation).

The cache file records what it was computed from: a hash of the teacher's weights, a hash of the sample file, the
temperature and the number of rows. Loading checks all four, then recomputes a few rows with the teacher and
compares, so a cache can never silently stand in for another teacher, other samples or other numerics. It also
holds a sha256 of its whole content (fingerprint, FLOPs, every row's logprobs), written when it is computed and
checked on load, so a row edited or damaged after the spot check (logprob 0 or NaN everywhere) is caught too.
A cache that fails any check is a one-line UserError naming the file (deleting it recomputes it); it is never
rebuilt silently, since several runs may share one cache_path. The file is read with weights_only=True: tensors
and plain data only, never code.
"""

from __future__ import annotations

import hashlib
import json
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


def content_hash(fingerprint: Mapping[str, Any], logprobs: list[Tensor], flops: float) -> str:
    """sha256 over everything the cache holds besides the hash itself, rows in order."""
    h = hashlib.sha256(json.dumps(dict(fingerprint), sort_keys=True, default=repr).encode())
    h.update(repr(float(flops)).encode())
    for lp in logprobs:
        t = lp.detach().to("cpu").contiguous()
        h.update(f"|{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_cache(path: Path, seqs: Sequences, fingerprint: Mapping[str, Any]) -> tuple[list[Tensor], float, bool]:
    """-> (the cache's rows, its FLOPs, whether its content matches its sha256), after checking its layout, its
    fingerprint against `fingerprint` and its row count and lengths against `seqs` (a UserError naming the file)."""
    delete = "delete it to recompute"
    try:
        cached = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise UserError(f"{path}: not a readable teacher cache ({type(e).__name__}); {delete}") from None
    if not isinstance(cached, dict):
        raise UserError(f"{path}: not a teacher cache (holds {type(cached).__name__}); {delete}")
    for key, kind in (("fingerprint", dict), ("logprobs", list), ("flops", float), ("sha256", str)):
        if not isinstance(cached.get(key), kind):
            what = "missing" if key not in cached else f"a {type(cached[key]).__name__}, not a {kind.__name__}"
            raise UserError(f"{path}: not a teacher cache of this version ({key!r} is {what}); {delete}")
    differs = [f"{k} {cached['fingerprint'].get(k)!r} vs {v!r}" for k, v in fingerprint.items()
               if cached["fingerprint"].get(k) != v]
    if differs:
        raise UserError(f"{path}: this teacher cache was computed from something else ({'; '.join(differs)}: "
                        "cache vs now); delete it to recompute, or point cache_path elsewhere")
    logprobs, flops = cached["logprobs"], cached["flops"]
    if len(logprobs) != len(seqs):
        raise UserError(f"{path}: holds {len(logprobs)} rows, the samples have {len(seqs)}; {delete}")
    for i, (lp, completion) in enumerate(zip(logprobs, seqs.completions, strict=True)):
        if not (isinstance(lp, Tensor) and lp.dtype.is_floating_point and tuple(lp.shape) == (len(completion),)):
            got = f"{tuple(lp.shape)} {lp.dtype}" if isinstance(lp, Tensor) else type(lp).__name__
            raise UserError(f"{path}: row {i} is {got}, not {len(completion)} logprobs (one per completion "
                            f"token); {delete}")
    return list(logprobs), flops, content_hash(cached["fingerprint"], logprobs, flops) == cached["sha256"]


def teacher_logprobs(path: Path, teacher: FrozenModel, seqs: Sequences, *, samples_file: Path,
                     temperature: float) -> tuple[list[Tensor], float, bool]:
    """-> (one (T_i,) logprob tensor per row, the teacher FLOPs the cache cost, whether it was computed now).
    An existing cache is used only if it was made from this teacher, these samples and this temperature."""
    fingerprint = {"teacher_weights": weights_hash(teacher.state_dict()), "samples": file_hash(samples_file),
                   "temperature": float(temperature), "rows": len(seqs)}
    if path.exists():
        cached, flops, intact = read_cache(path, seqs, fingerprint)
        edited = "the cache was edited or damaged after it was computed (its content does not match its sha256)"
        check = list(range(min(SPOT_CHECK_ROWS, len(seqs))))
        fresh, _ = teacher.logprobs(Sequences([seqs.prompts[i] for i in check], [seqs.completions[i] for i in check]),
                                    temperature=temperature)
        for i, lp in zip(check, fresh, strict=True):
            gap = float((lp - cached[i].to(lp)).abs().max()) if lp.numel() else 0.0
            if not gap <= SPOT_CHECK_ATOL:  # NaN fails too
                why = "the teacher's numerics changed (bf16? another device?)" if intact else edited
                raise UserError(f"{path}: row {i} of the cache differs from the teacher by {gap:.3g} (> "
                                f"{SPOT_CHECK_ATOL}); {why}: delete the cache to recompute")
        if not intact:  # rows past the spot check
            raise UserError(f"{path}: {edited}; delete it to recompute")
        return cached, flops, False
    logprobs, flops = teacher.logprobs(seqs, temperature=temperature)
    flops = float(flops)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"fingerprint": fingerprint, "logprobs": logprobs, "flops": flops,
                "sha256": content_hash(fingerprint, logprobs, flops)}, tmp)
    tmp.replace(path)
    return logprobs, flops, True
