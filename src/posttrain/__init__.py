"""posttrain: the science of LLM post-training, runnable on a laptop."""

import os

# Before anything imports torch and runs a matrix product: MKL's fp32 batched GEMM (torch.bmm, the attention scores
# of the local engine's decode) rounds differently with the memory alignment of its operands unless its conditional
# numerical reproducibility is on, and two processes get differently aligned buffers, so a long RL run drifted
# apart at a random step (posttrain/kernels.py; docs/reliability.md, "Determinism"). A value the user set wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# ... and, as MKL's reproducibility conditions require, a fixed thread count: MKL and OpenMP may otherwise use
# fewer threads for a call than asked, and a product split over fewer threads sums in another order.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")

__version__ = "0.1.0"
