"""Diversity of an SFT set measured in gradient space (G-Vendi) and by n-grams, and a diverse subset of it.

    posttrain data diversity data.jsonl                     # prints "G-Vendi: <value>" and the n-gram baselines
    posttrain data select data.jsonl -n 500 -o subset.jsonl --env arithmetic

G-Vendi (Jung et al., "Prismatic Synthesis", 2025): each example's feature is the gradient of its SFT loss (the
completion's tokens given the prompt) under a small proxy model, restricted to the last `layers` decoder layers
and the final norm, sketched to `dim` numbers by a seeded random projection (a count sketch: each parameter is
added, with a random sign, to one of `dim` buckets; a Johnson-Lindenstrauss map that needs no P x dim matrix),
then normalised to unit length. The Vendi score of n unit vectors is exp(entropy of the eigenvalues of K / n),
K their cosine-similarity matrix: 1 when all are identical, n when all are orthogonal, "the effective number of
distinct examples". The proxy is a local checkpoint or a preset (random init by default: gradients of an
untrained model still separate examples by their tokens; a trained proxy separates them by what they teach).

Selection: of the examples that pass the quality filter (the environment's verifier on the completion, or
majority vote over the completions of one prompt), a greedy pass keeps adding those that lie in the directions
of gradient space the subset has least of (the first-order gain in the Vendi score's entropy), so the subset's
G-Vendi is high. Over-generation (Prismatic Synthesis' second half): the candidates are clustered (k-means) and
new tasks from the environment are kept only where a cluster is short of n / k members.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def vendi_score(features: Tensor) -> float:
    """exp(-Σ λ log λ) over the eigenvalues λ of K / n, K = X X^T of the rows of `features` normalised to unit
    length. Computed from the d x d matrix X^T X / n when d < n (the same non-zero eigenvalues)."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    n = x.shape[0]
    if n == 0:
        return 0.0
    gram = (x.T @ x if x.shape[1] < n else x @ x.T) / n
    lam = torch.linalg.eigvalsh(gram).clamp(min=0)
    lam = lam[lam > 1e-12]
    return float(torch.exp(-(lam * lam.log()).sum()))


def count_sketch(size: int, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """(bucket (size,), sign (size,)) of a seeded count sketch from `size` coordinates to `dim`."""
    g = torch.Generator().manual_seed(seed)
    bucket = torch.randint(0, dim, (size,), generator=g)
    sign = torch.randint(0, 2, (size,), generator=g).float() * 2 - 1
    return bucket, sign


def sketch(vector: Tensor, bucket: Tensor, sign: Tensor, dim: int) -> Tensor:
    """The count sketch of one vector: out[b] = Σ_{i: bucket_i = b} sign_i v_i."""
    return torch.zeros(dim, dtype=vector.dtype).index_add_(0, bucket, vector * sign)


def last_layer_parameters(model: Any, layers: int) -> list[torch.nn.Parameter]:
    """The parameters of the last `layers` decoder layers and the final norm of a Hugging Face causal LM."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    params = [p for layer in list(body.layers)[-layers:] for p in layer.parameters()]
    if getattr(body, "norm", None) is not None:
        params += list(body.norm.parameters())
    return params


@dataclass(frozen=True)
class GradientFeatures:
    """Per-example sketched gradients of the SFT loss under a proxy model."""

    model: Any
    layers: int = 1
    dim: int = 1024
    seed: int = 0

    def __call__(self, examples: Sequence[tuple[list[int], list[int]]],
                 progress: Callable[[int], None] | None = None) -> Tensor:
        params = last_layer_parameters(self.model, self.layers)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        size = sum(p.numel() for p in params)
        bucket, sign = count_sketch(size, self.dim, self.seed)
        slices, offset = [], 0
        for p in params:
            slices.append((p, slice(offset, offset + p.numel())))
            offset += p.numel()
        # The gradients accumulate into each parameter's .grad, reused (zeroed) from example to example: a fresh
        # few-MB gradient per example made glibc's heap grow by ~100 MB/s over thousands of examples.
        scratch = torch.empty(max(p.numel() for p in params))
        rows = torch.zeros(len(examples), self.dim)
        self.model.eval()
        for p in params:
            p.grad = torch.zeros_like(p)
        for i, (prompt, completion) in enumerate(examples):
            ids = torch.tensor([prompt + completion])
            labels = torch.tensor([[-100] * len(prompt) + completion])
            self.model(input_ids=ids, labels=labels).loss.backward()
            for p, part in slices:
                g = scratch[: p.numel()]
                torch.mul(p.grad.reshape(-1), sign[part], out=g)
                rows[i].index_add_(0, bucket[part], g)  # the count sketch of the whole gradient, part by part
                p.grad.zero_()
            if progress is not None:
                progress(i + 1)
        for p in params:
            p.grad = None
        return rows


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique character n-grams over all character n-grams of the texts (0 when there are none)."""
    grams = [t[i: i + n] for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def ngram_vendi(texts: Sequence[str], n: int = 2) -> float:
    """The Vendi score of bag-of-character-n-gram vectors: the embedding-free counterpart of G-Vendi."""
    vocab: dict[str, int] = {}
    rows = [Counter(t[i: i + n] for i in range(len(t) - n + 1)) for t in texts]
    for row in rows:
        for g in row:
            vocab.setdefault(g, len(vocab))
    x = torch.zeros(len(texts), max(1, len(vocab)))
    for r, row in enumerate(rows):
        for g, c in row.items():
            x[r, vocab[g]] = c
    x[x.sum(1) == 0, 0] = 1.0  # an empty text: one shared direction, not a NaN
    return vendi_score(x)


def kmeans(x: Tensor, k: int, *, seed: int, iters: int = 50) -> tuple[Tensor, Tensor]:
    """(cluster label of each row, the k centres) of the rows of x (unit-normalised), by Lloyd's k-means from a
    seeded k-means++ start."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(0, len(x), (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d = torch.cdist(x, torch.stack(centres)).min(1).values ** 2
        if d.sum() <= 0:
            break
        centres.append(x[torch.multinomial(d / d.sum(), 1, generator=g)].squeeze(0))
    c = torch.stack(centres)
    labels = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        if _ and torch.equal(new, labels):
            break
        labels = new
        c = torch.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(len(c))])
    return labels, c


def nearest_centre(x: Tensor, centres: Tensor) -> Tensor:
    """The cluster of each row of x: its nearest centre (x unit-normalised, as kmeans sees it)."""
    return torch.cdist(torch.nn.functional.normalize(x.double(), dim=1), centres).argmin(1)


def select_diverse(features: Tensor, n: int, *, seed: int = 0, rounds: int = 40, rank: int = 256) -> list[int]:
    """n rows of `features` chosen greedily for a high Vendi score. The Vendi score is exp(entropy) of the
    spectrum of C = X^T X / |S| (unit rows); adding x changes the entropy, to first order, by -x^T log(C) x plus
    terms the same for every x, so each round adds the n / rounds candidates that lie most in the directions the
    set has least of (largest -x^T log(C + eps) x). The features are first reduced to their top `rank` principal
    directions (the cost per round is candidates x rank^2). Starts from one seeded random row."""
    if n >= len(features):
        return list(range(len(features)))
    x = torch.nn.functional.normalize(features.double(), dim=1)
    if x.shape[1] > rank:
        x = torch.nn.functional.normalize(x @ torch.linalg.svd(x, full_matrices=False).Vh[:rank].T, dim=1)
    chosen = torch.zeros(len(x), dtype=torch.bool)
    chosen[int(torch.randint(0, len(x), (1,), generator=torch.Generator().manual_seed(seed)))] = True
    per_round = max(1, math.ceil((n - 1) / rounds))
    while int(chosen.sum()) < n:
        s = x[chosen]
        lam, vec = torch.linalg.eigh(s.T @ s / len(s))
        log_c = (vec * torch.log(lam.clamp(min=0) + 1e-6)) @ vec.T
        gain = -((x @ log_c) * x).sum(1)
        gain[chosen] = -math.inf
        take = min(per_round, n - int(chosen.sum()))
        chosen[gain.topk(take).indices] = True
    return chosen.nonzero().squeeze(-1).tolist()


def cluster_count(n: int, clusters: int | None) -> int:
    return clusters or max(2, round(math.sqrt(n)))


def shortfall(features: Tensor, n: int, *, clusters: int | None, seed: int) -> tuple[Tensor, dict[int, int]]:
    """Prismatic Synthesis' target for over-generation: the k-means centres of `features` and, for every cluster
    with fewer than n / k members, how many more it needs for an even subset of n."""
    k = min(cluster_count(n, clusters), len(features))
    labels, centres = kmeans(features, k, seed=seed)
    per = math.ceil(n / k)
    counts = torch.bincount(labels, minlength=k).tolist()
    return centres, {j: per - c for j, c in enumerate(counts) if c < per}
