"""Offline on-policy distillation: the OPD signal on a fixed sample set, with the teacher's logprobs cached.

    posttrain distill-data runs/student --keep-failed --samples 4 --keep 4 --out data/student-samples.jsonl
    posttrain run recipes/distill/opd-offline.toml

The samples (rows of prompt and completion; typically the student's own, sampled once) are scored by the teacher
once, at the start of the stage, into a cache (train/teacher_cache.py: checked against the teacher's weights, the
sample file and the temperature, and spot-checked by recomputing rows), so training runs no teacher and no
generation. Each step takes `batch_size` rows and applies the OPD update of the online stage, REINFORCE with the
per-token advantage coef · (log π_T - log π_θ), π_θ the current student: on samples from a fixed distribution q its
gradient is that of coef · E_q[½ (log π_θ - log π_T)²] (k2 on q's samples; on-policy, q = π_θ, it would be the
reverse KL's). The loss logged is that value, mean per token; `distill/reverse_kl` the mean of log π_θ - log π_T.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from posttrain.config import StageConfig
from posttrain.data.prompts import completion_ids, render_prompt
from posttrain.data.sft import Example, fitting, read_pairs
from posttrain.data.tables import data_columns_field, data_path_field
from posttrain.runtime.context import RunContext
from posttrain.runtime.ledger import Measured
from posttrain.runtime.loop import StageLoop
from posttrain.stages import Cursor, StageResume, register_stage
from posttrain.train.learner import ForwardOut, Sequences
from posttrain.train.teacher_cache import teacher_logprobs


class OfflineOPDConfig(StageConfig):
    """Offline distillation from [teacher] on a fixed sample file (plus the optimizer keys of [sft])."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    data_path: str = data_path_field("The fixed samples: rows of prompt and completion, e.g. the student's own "
                                     "from `posttrain distill-data STUDENT --keep-failed`", unset=None)
    data_columns: dict[str, str] = data_columns_field("prompt and completion", '{prompt = "question"}')
    steps: int = Field(100, gt=0, description="Optimizer steps.")
    batch_size: int = Field(64, gt=0, description="Rows per optimizer step (global).")
    micro_batch_size: int = Field(64, gt=0, description="Rows per forward/backward (per device).")
    coef: float = Field(1.0, gt=0, description="Weight of the distillation signal.")
    temperature: float = Field(1.0, gt=0, description="Temperature of both models' logprobs.")
    cache_path: str | None = Field(None, description="The teacher-logprob cache (relative to the recipe file); "
                                   "default: teacher_cache.pt in the run directory. Point several runs at one "
                                   "file to score the samples once; a cache from another teacher, other samples "
                                   "or another temperature is refused.")
    eval_every: int = Field(0, ge=0, description="Held-out evaluation every N steps (0 = only at the end).")

    def teacher_keys(self) -> list[str]:
        return ["data_path"]


@dataclass(frozen=True)
class OfflineOPDLoss:
    """-coef · Σ sg(log π_T - log π_θ) log π_θ over the micro-batch's tokens / the step's tokens; its value is
    reported as the k2 mean coef · ½ (log π_θ - log π_T)² (the objective whose gradient it is)."""

    teacher: Tensor  # (B, T) the teacher's logprobs of every row of the step, right-padded
    tokens: int
    coef: float

    def __call__(self, out: ForwardOut) -> tuple[Tensor, dict[str, float]]:
        m = out.mask.bool()
        t = self.teacher[out.rows, : out.logprobs.shape[1]].to(out.logprobs.device)
        lp = torch.where(m, out.logprobs, torch.zeros_like(out.logprobs))
        gap = torch.where(m, lp.detach() - t, torch.zeros_like(lp))  # log π_θ - log π_T
        surrogate = (self.coef * gap * lp).sum() / max(self.tokens, 1)  # gradient: coef · gap · ∇log π_θ
        k2 = float((0.5 * self.coef * gap**2).sum()) / max(self.tokens, 1)
        return surrogate, {"k2": k2, "reverse_kl": float(gap.sum()) / max(self.tokens, 1)}


@register_stage("opd_offline", OfflineOPDConfig, state=Cursor)
def run(ctx: RunContext, c: OfflineOPDConfig, resume: StageResume | None) -> None:
    parts, say = ctx.parts, ctx.services
    tok = parts.tokenizer
    loop = StageLoop(ctx, c, resume, steps=c.steps)
    rows = [fitting(Example(render_prompt(tok, p, chat_template=parts.chat_template, max_len=parts.max_len),
                            completion_ids(tok, text, chat_template=parts.chat_template)), parts.max_len, where)
            for where, p, text in read_pairs(Path(c.data_path), c.data_columns, section="opd_offline")]
    seqs = Sequences([r.prompt for r in rows], [r.completion for r in rows])
    cache = Path(c.cache_path) if c.cache_path else parts.run_dir / "teacher_cache.pt"
    t0 = time.time()
    say.phase("teacher-cache", f"teacher logprobs of {len(rows)} samples ({cache})")
    teacher, flops, built = teacher_logprobs(cache, parts.teacher, seqs, samples_file=Path(c.data_path),
                                             temperature=c.temperature)
    if not resume:  # the cache's cost is this run's work whether it was computed now or reused
        note = (f"opd_offline: teacher logprobs of {len(rows)} samples {'computed' if built else 'read'} ({cache}, "
                f"{flops:.3g} FLOPs, {time.time() - t0:.1f} s)")
        loop.account(Measured(flops={"teacher": flops}, notes=[note]))
    cursor = resume.state.cursor if resume else 0
    order = itertools.islice(epochs(len(rows), parts.seed), cursor, None)
    for step in loop.steps():
        t_step = time.time()
        ids = list(itertools.islice(order, c.batch_size))
        cursor += len(ids)
        batch = Sequences([seqs.prompts[i] for i in ids], [seqs.completions[i] for i in ids])
        width = max(len(x) for x in batch.completions)
        padded = torch.zeros(len(ids), width)
        for j, i in enumerate(ids):
            padded[j, : len(teacher[i])] = teacher[i]
        say.phase("train", f"forward/backward over {len(ids)} samples")
        tokens = sum(len(x) for x in batch.completions)
        result = loop.learner.train_step(batch, OfflineOPDLoss(padded, tokens, c.coef), temperature=c.temperature,
                                         where=f"opd_offline step {step + 1}")
        loop.trained(result)
        say.status(f"k2 {result.metrics['k2']:.3f}")
        loop.end_step({"distill/k2": result.metrics["k2"], "distill/reverse_kl": result.metrics["reverse_kl"],
                       "train/grad_norm": result.grad_norm, "train/lr": result.lr, "train/examples_seen": cursor,
                       "time/step_s": time.time() - t_step}, Cursor(cursor), eval_every=c.eval_every)
    loop.end_stage(Cursor(cursor))


def epochs(n: int, seed: int):
    """Row indices, epoch after epoch, each epoch in a fresh seeded order."""
    for epoch in itertools.count():
        order = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        yield from order
