"""The Learner: the only place with a backward pass and an optimizer step.

    learner = Learner(model, lr=1e-4, total_updates=200, micro_batch_size=64, pad_id=tok.pad_token_id)
    old = learner.logprobs(seqs, temperature=1.0)                       # no-grad logprobs, one (T_i,) per row
    result = learner.train_step(seqs, loss_fn, rows=rows)               # one optimizer update -> StepResult
    engine.update_weights(learner.weights(), version)

`train_step` runs the rows it is given in micro-batches of `micro_batch_size` (in the order given: SFT sorts by
length, RL keeps groups together so they share their prompt's forward pass), calls `loss_fn` on each micro-batch's
logprobs and backpropagates it, then fills missing gradients with zeros, clips, checks that the loss and gradient
are finite (a bad update is skipped; `max_bad_steps` in a row stop the run), steps the optimizer and the schedule.
It never calls back into the run: what happened (loss, gradient norm, a skipped update and why, FLOPs) comes back
in the StepResult, so the same object can later live in another process (a Ray actor) unchanged.

The loss function sees one micro-batch at a time and must return a loss already divided by the step's GLOBAL
normalisers (algos/aggregation.py), so that summing micro-batch losses gives the full-batch loss and gradient
whatever the split. That is why micro_batch_size never changes results beyond float rounding.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from posttrain.tracking.ledger import FlopModel
from posttrain.train.forward import (
    completion_logprobs,
    example_flops,
    pack,
    pack_examples,
    packed_completion_logprobs,
    packed_flops,
)
from posttrain.train.guards import UpdateGuard
from posttrain.train.optim import build_optimizer, build_scheduler
from posttrain.train.sharding import DataParallel, full, full_state_dict


@dataclass(frozen=True)
class Sequences:
    """Rows of (prompt, completion) token ids: what a forward pass runs over. Row i's completion tokens are the
    positions that get logprobs; a batch's per-token tensors are (B, T) aligned with them."""

    prompts: Sequence[Sequence[int]]
    completions: Sequence[Sequence[int]]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.completions):
            raise ValueError(f"Sequences: {len(self.prompts)} prompts but {len(self.completions)} completions")

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class ForwardOut:
    """One micro-batch, as a loss function sees it."""

    rows: Tensor  # (b,) which rows of the Sequences these are
    logprobs: Tensor  # (b, t) fp32 log-probabilities of the completion tokens; carries the gradient
    mask: Tensor  # (b, t) 1 on real completion tokens (t = the widest completion of this micro-batch)
    entropy: Tensor | None  # (b, t) entropy of the next-token distribution, when asked for


class LossFn(Protocol):
    def __call__(self, out: ForwardOut) -> tuple[Tensor, dict[str, float]]:
        """-> (scalar loss of this micro-batch, already divided by the global normalisers; metric sums)."""
        ...


@dataclass(frozen=True)
class StepResult:
    loss: float  # sum of the micro-batch losses: the step's loss
    grad_norm: float  # global gradient norm before clipping
    lr: float  # learning rate of this update
    skipped: str | None  # why the update was not applied (non-finite loss or gradient), or None
    metrics: dict[str, float] = field(default_factory=dict)  # the loss function's metric sums, added up
    rows: int = 0  # rows forwarded
    tokens: int = 0  # completion tokens forwarded
    flops: float = 0.0  # model FLOPs of the forward and backward passes


def micro_batches(rows: Tensor, seqs: Sequences, max_rows: int, max_tokens: int | None,
                  keep_together: Tensor | None = None) -> list[Tensor]:
    """`rows` cut, in order, into runs of at most `max_rows` rows and at most `max_tokens` padded tokens (rows x
    (longest prompt + longest completion) of the run, what the forward pass holds activations for). A single row
    longer than the budget is a micro-batch of its own. Only memory and speed depend on the cut, not the loss.
    `keep_together` (one id per row of `seqs`): consecutive rows with one id are a unit that is never cut, so a loss
    that couples rows (a preference pair) sees all of them in one micro-batch; a unit over the limits is alone."""
    ids = rows.tolist()
    units: list[list[int]] = []  # runs of consecutive positions in `ids` that stay together
    for i, r in enumerate(ids):
        if units and keep_together is not None and bool(keep_together[r] == keep_together[ids[i - 1]]):
            units[-1].append(i)
        else:
            units.append([i])
    out: list[Tensor] = []
    start, n, widest_p, widest_c = 0, 0, 0, 0
    for unit in units:
        p = max(widest_p, *(len(seqs.prompts[ids[i]]) for i in unit))
        c = max(widest_c, *(len(seqs.completions[ids[i]]) for i in unit))
        grown = n + len(unit)
        if n and (grown > max_rows or (max_tokens is not None and grown * (p + c) > max_tokens)):
            out.append(rows[start:unit[0]])
            start, grown = unit[0], len(unit)
            p = max(len(seqs.prompts[ids[i]]) for i in unit)
            c = max(len(seqs.completions[ids[i]]) for i in unit)
        n, widest_p, widest_c = grown, p, c
    if ids:
        out.append(rows[start:])
    return out


class FrozenModel:
    """A model that only computes logprobs: a reference policy or a teacher. Counts its own FLOPs."""

    def __init__(self, model: nn.Module, *, micro_batch_size: int, pad_id: int, bf16: bool = False,
                 micro_batch_tokens: int | None = None, prompt_pass: bool | None = None) -> None:
        self.model = model
        self.prompt_pass = prompt_pass  # forward.pack: True on a sharded learner
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.pad_id = pad_id
        self.bf16 = bf16
        self.flop_model = FlopModel.from_model(model)

    @torch.no_grad()
    def logprobs(self, seqs: Sequences, *, temperature: float = 1.0) -> tuple[list[Tensor], float]:
        """-> (one (T_i,) CPU tensor of logprobs per row, forward FLOPs spent)."""
        was_training = self.model.training
        self.model.eval()
        out: list[Tensor] = []
        flops = 0.0
        try:
            for chunk in micro_batches(torch.arange(len(seqs)), seqs, self.micro_batch_size, self.micro_batch_tokens):
                prompts = [seqs.prompts[i] for i in chunk.tolist()]
                completions = [seqs.completions[i] for i in chunk.tolist()]
                lp, _ = completion_logprobs(self.model, pack(prompts, completions, self.pad_id,
                                                             prompt_pass=self.prompt_pass),
                                            temperature=temperature, bf16=self.bf16)
                flops += packed_flops(self.flop_model, prompts, completions)
                out += [lp[i, : len(c)].cpu() for i, c in enumerate(completions)]
        finally:
            self.model.train(was_training)
        return out, flops

    def load_weights(self, weights: Mapping[str, Tensor]) -> None:
        self.model.load_state_dict(weights)

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Hugging Face's per-block gradient checkpointing, non-reentrant so it composes with FSDP2 and autocast. It
    acts in training mode only: generation (eval mode, no gradient) is unchanged."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextmanager
def recomputing(model: nn.Module, on: bool) -> Iterator[None]:
    """Training mode for the passes of a step with activation checkpointing (transformers recomputes blocks only
    in training mode; a model with dropout then drops out too). Without it the mode is left as it is."""
    was_training = model.training
    if on:
        model.train()
    try:
        yield
    finally:
        model.train(was_training)


class Learner:
    def __init__(self, model: nn.Module, *, lr: float, total_updates: int, micro_batch_size: int, pad_id: int,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 0,
                 schedule: str = "constant", min_lr_ratio: float = 0.1, grad_clip: float = 1.0,
                 max_bad_steps: int = 3, bf16: bool = False, compile: bool = False,
                 micro_batch_tokens: int | None = None, data_parallel: DataParallel | None = None,
                 activation_checkpointing: bool = False) -> None:
        """micro_batch_size / micro_batch_tokens: the most rows, and padded tokens, per forward/backward pass.
        data_parallel: this rank's place when `model` is sharded over several processes (train/sharding.py);
        every rank then calls every method with the same arguments, and each runs its share of the micro-batches.
        activation_checkpointing: recompute each decoder block in the backward pass instead of keeping its
        activations (memory for compute)."""
        self.model = model
        self.dp = data_parallel
        # forward.pack's prompt_pass: a sharded learner runs as many passes on every rank (each is a collective);
        # a recomputed block cannot replay a pass that appends to a KV cache, so checkpointing runs rows whole.
        self.prompt_pass = False if activation_checkpointing else True if data_parallel is not None else None
        self.activation_checkpointing = activation_checkpointing
        if activation_checkpointing:
            enable_activation_checkpointing(model)
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.pad_id = pad_id
        self.bf16 = bf16
        self.grad_clip = grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, lr=lr, weight_decay=weight_decay, betas=betas)
        self.scheduler = build_scheduler(self.optimizer, total_steps=total_updates, warmup_steps=warmup_steps,
                                         schedule=schedule, min_lr_ratio=min_lr_ratio)
        self.guard = UpdateGuard(max_bad_steps)
        # The training and logprob passes may run a compiled wrapper of the same parameters; weights(),
        # checkpoints and generation use the plain module, whose state_dict has no wrapper prefixes.
        self.forward_model = torch.compile(model, dynamic=True) if compile else model
        self.flop_model = FlopModel.from_model(model)
        self._frozen_self = FrozenModel(self.forward_model, micro_batch_size=micro_batch_size, pad_id=pad_id,
                                        bf16=bf16, micro_batch_tokens=micro_batch_tokens,
                                        prompt_pass=self.prompt_pass)
        self._frozen_self.flop_model = self.flop_model

    # -- passes without gradient ---------------------------------------------------------------------------------
    def logprobs(self, seqs: Sequences, *, temperature: float = 1.0) -> tuple[list[Tensor], float]:
        """The current policy's logprobs of every row (old-policy logprobs). -> (per-row tensors, FLOPs).
        Sharded, each rank runs its share of the micro-batches and every rank gets every row's."""
        if self.dp is None:
            return self._frozen_self.logprobs(seqs, temperature=temperature)
        chunks = self.dp.my_chunks(micro_batches(torch.arange(len(seqs)), seqs, self.micro_batch_size,
                                                 self.micro_batch_tokens))
        mine: list[tuple[int, Tensor]] = []
        flops = 0.0
        for chunk in chunks:  # one pass per micro-batch, as many on every rank: each pass is a collective
            rows = chunk.tolist() if chunk is not None else [0]
            lps, f = self._frozen_self.logprobs(Sequences([seqs.prompts[i] for i in rows],
                                                          [seqs.completions[i] for i in rows]), temperature=temperature)
            if chunk is not None:
                mine += list(zip(rows, lps, strict=True))
                flops += f
        out: list[Tensor] = [torch.empty(0)] * len(seqs)
        for i, lp in self.dp.gather(mine):
            out[i] = lp
        return out, self.dp.sum(flops)

    def frozen_copy(self) -> FrozenModel:
        """A frozen snapshot of the current policy (the reference of a KL term)."""
        ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        return FrozenModel(ref, micro_batch_size=self.micro_batch_size, pad_id=self.pad_id, bf16=self.bf16,
                           micro_batch_tokens=self.micro_batch_tokens)

    # -- one optimizer update ------------------------------------------------------------------------------------
    def train_step(self, seqs: Sequences, loss_fn: LossFn, *, rows: Tensor | None = None,
                   temperature: float = 1.0, with_entropy: bool = False, where: str = "update",
                   keep_together: Tensor | None = None, pack_tokens: int | None = None) -> StepResult:
        """One optimizer update over `rows` (default: all) of `seqs`. `where` labels errors ("rl step 12").
        `keep_together`: row ids that must share a micro-batch (micro_batches). `pack_tokens`: lay each
        micro-batch's examples end to end in rows of at most this many tokens (packed SFT; same loss)."""
        rows = torch.arange(len(seqs)) if rows is None else rows
        lr = self.scheduler.get_last_lr()[0]
        total_loss, flops, tokens = 0.0, 0.0, 0
        metrics: dict[str, float] = {}
        chunks: list[Tensor | None] = list(micro_batches(rows, seqs, self.micro_batch_size, self.micro_batch_tokens,
                                                         keep_together))
        if self.dp is not None:
            chunks = self.dp.my_chunks(chunks)  # type: ignore[arg-type]
        with recomputing(self.model, self.activation_checkpointing):
            for chunk in chunks:
                if chunk is None:  # another rank has one more micro-batch: its collectives need this rank too
                    self._idle_pass(seqs, rows[:1], temperature)
                    continue
                prompts = [seqs.prompts[i] for i in chunk.tolist()]
                completions = [seqs.completions[i] for i in chunk.tolist()]
                lp, entropy, mask, work = self._forward(prompts, completions, temperature, with_entropy, pack_tokens)
                loss, parts = loss_fn(ForwardOut(rows=chunk, logprobs=lp, mask=mask, entropy=entropy))
                loss.backward()
                total_loss += loss.item()
                for k, v in parts.items():
                    metrics[k] = metrics.get(k, 0.0) + float(v)
                flops += work
                tokens += int(mask.sum())
        if self.dp is not None:  # the step's loss, metrics and work are every rank's added up
            total_loss, flops, tokens = self.dp.sum(total_loss), self.dp.sum(flops), int(self.dp.sum(tokens))
            metrics = self.dp.sum_dicts(metrics)
        for p in self.params:  # rows that were all skipped are a zero gradient, not no step (Adam still moves)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grad_norm = float(full(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)))
        skipped = self.guard.check(self.model, loss=total_loss, grad_norm=grad_norm, where=where)
        if skipped is None:
            self.optimizer.step()
            self.scheduler.step()
        else:
            with warnings.catch_warnings():  # a skipped update still advances the schedule, on purpose
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=total_loss, grad_norm=grad_norm, lr=lr, skipped=skipped, metrics=metrics,
                          rows=len(rows), tokens=tokens, flops=flops)

    def _forward(self, prompts: list[list[int]], completions: list[list[int]], temperature: float,
                 with_entropy: bool, pack_tokens: int | None) -> tuple[Tensor, Tensor | None, Tensor, float]:
        """The training pass over one micro-batch -> (logprobs, entropy, mask, FLOPs): the engine's layout, or
        with pack_tokens the examples packed end to end into rows of at most that many tokens (no padding)."""
        if pack_tokens:
            packs = pack_examples(prompts, completions, self.pad_id, pack_tokens)
            lp, entropy = packed_completion_logprobs(self.forward_model, packs, temperature=temperature,
                                                     bf16=self.bf16, with_entropy=with_entropy)
            return lp, entropy, packs.mask.to(lp.device), example_flops(self.flop_model, prompts, completions)
        packed = pack(prompts, completions, self.pad_id, prompt_pass=self.prompt_pass)
        lp, entropy = completion_logprobs(self.forward_model, packed, temperature=temperature, bf16=self.bf16,
                                          with_entropy=with_entropy)
        return (lp, entropy, packed.mask.to(lp.device),
                packed_flops(self.flop_model, prompts, completions, train=True))

    def _idle_pass(self, seqs: Sequences, rows: Tensor, temperature: float) -> None:
        """A forward and backward that contribute exactly zero to the gradient."""
        packed = pack([seqs.prompts[i] for i in rows.tolist()], [seqs.completions[i] for i in rows.tolist()],
                      self.pad_id, prompt_pass=self.prompt_pass)
        lp, _ = completion_logprobs(self.forward_model, packed, temperature=temperature, bf16=self.bf16)
        (lp.sum() * 0.0).backward()

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moment estimates (ProRL's optimizer re-initialisation at a reference reset)."""
        self.optimizer.state.clear()

    # -- weights and state ---------------------------------------------------------------------------------------
    def weights(self) -> Mapping[str, Tensor]:
        """What changed: the policy weights for an engine's update_weights (live tensors: copy before mutating).
        With a frozen base (LoRA) only the trainable adapter tensors: the engine already holds the base."""
        if any(not p.requires_grad for p in self.model.parameters()):
            return {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        if self.dp is not None:  # gathered whole (a collective: every rank calls it)
            return full_state_dict(self.model)
        return self.model.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "bad_steps": self.guard.bad_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "shards" in state:  # written by a sharded learner of any world size (train/learner_group.py)
            from posttrain.train.sharding import load_learner

            load_learner(self, Path(state["shards"]))
            return
        # A copy: torch's optimizer keeps the given moment tensors when dtype and device already match, so a state
        # taken from a live learner would otherwise be shared by both and updated twice.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.guard.bad_steps = int(state["bad_steps"])
