"""The sharded learner's side of tests/train/test_sharding.py: one function that each of the gloo ranks runs, and the
single-process run it is compared with. Both train the same model on the same batch with the same loss."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from posttrain.train.learner import Learner, Sequences

STEPS = 2


def batch() -> tuple[Sequences, int]:
    """Seven rows of different lengths (so micro-batches of 3 rows leave one rank a micro-batch short)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 40, (int(n),), generator=g).tolist() for n in (3, 5, 4, 6, 2, 5, 3)]
    completions = [torch.randint(3, 40, (int(n),), generator=g).tolist() for n in (4, 2, 6, 3, 5, 1, 4)]
    return Sequences(prompts, completions), sum(len(c) for c in completions)


class SummedNLL:
    """SFT's loss: summed token NLL over the whole batch's completion tokens (a global normaliser)."""

    def __init__(self, total_tokens: int):
        self.total_tokens = total_tokens

    def __call__(self, out):
        nll = -torch.where(out.mask.bool(), out.logprobs, torch.zeros_like(out.logprobs)).sum()
        return nll / self.total_tokens, {"nll_sum": float(nll.detach())}


def train(model, *, steps: int = STEPS, load: str | None = None, save: str | None = None,
          **learner_args) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """`steps` updates, after restoring the learner from `load` and before saving it to `save` (if given)."""
    from posttrain.train.sharding import load_learner, save_learner

    seqs, total = batch()
    learner = Learner(model, lr=1e-2, total_updates=STEPS, micro_batch_size=3, pad_id=0, **learner_args)
    if load:
        load_learner(learner, Path(load))
    results = []
    for _ in range(steps):
        r = learner.train_step(seqs, SummedNLL(total))
        results.append({"loss": r.loss, "grad_norm": r.grad_norm, "tokens": r.tokens, "nll_sum": r.metrics["nll_sum"]})
    if save:
        save_learner(learner, Path(save))
    return results, {k: v.detach().clone() for k, v in learner.weights().items()}


def rank_main(rank: int, world_size: int, model_dir: str, out_dir: str, train_args: dict | None = None) -> None:
    import torch.distributed as dist

    from posttrain.models import load_model
    from posttrain.train.sharding import DataParallel, shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world_size)
    try:
        model = shard(load_model(Path(model_dir)).float())
        results, weights = train(model, data_parallel=DataParallel.current(), **(train_args or {}))
        if rank == 0:
            Path(out_dir, "results.json").write_text(json.dumps(results))
            save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(out_dir, "weights.safetensors")))
    finally:
        dist.destroy_process_group()
