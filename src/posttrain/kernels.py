"""Whether this process's CPU matrix kernels give the same bits for the same numbers wherever they lie in memory.

Found by bisecting a long RL run that repeated bit for bit until one step and differed from it on (issue 36: at
global step 717 on 2026-12-01, at step 387 here): MKL's fp32 batched GEMM, which `torch.bmm` and `q @ k.T` run on
CPU (the attention scores of the local engine's decode), takes a code path that depends on the memory alignment of
its operands, and rounds differently on each (3 in 4 offsets of 256 small products gave other bits). Two processes
get differently aligned buffers from their allocators, so the engine's logprobs, the PPO denominators, differed in
the last bit at some step, and from there the weights. MKL's conditional numerical reproducibility
(`MKL_CBWR=AUTO,STRICT`) makes the result independent of alignment; MKL reads it at its first call, so
posttrain/__init__.py sets it on import, before torch runs any product. `alignment_sensitive` measures whether it
took effect (a user who ran a torch product before importing posttrain, or set MKL_CBWR otherwise): the runner
writes a warning to run.log when it did not.
"""

from __future__ import annotations

import torch


def _at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of `t` that starts `offset` elements into a fresh buffer (another alignment, the same numbers)."""
    buffer = torch.empty(t.numel() + 16, dtype=t.dtype)
    view = buffer[offset: offset + t.numel()].view_as(t)
    view.copy_(t)
    return view


def alignment_sensitive() -> bool:
    """True when an fp32 batched product gives other bits for its operands at other alignments (a few ms)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, 1, 32, generator=g), torch.randn(64, 20, 32, generator=g)
    reference = torch.bmm(q, k.transpose(1, 2))
    return any(not torch.equal(torch.bmm(_at_offset(q, a), _at_offset(k, b).transpose(1, 2)), reference)
               for a in range(4) for b in range(4))
