"""The compute ledger: FLOPs for every kind of work a run does (DESIGN.md, "Compute ledger").

Per token, a forward pass costs ~2N FLOPs for N parameters in matrix multiplies (Kaplan et al. 2020), a forward
plus backward ~6N. These are the standard approximations; the attention-score term (2 * layers * context * d per
token) is small at the context lengths of these runs and is added where the context is known.
"""

from __future__ import annotations


def forward_flops(n_params: int, tokens: int) -> float:
    return 2.0 * n_params * tokens


def train_flops(n_params: int, tokens: int) -> float:
    return 6.0 * n_params * tokens
