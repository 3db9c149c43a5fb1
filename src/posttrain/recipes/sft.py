"""SFT: next-token loss on completion tokens only.

    posttrain run recipes/sft-tiny.toml

One step: take `batch_size` examples, run them through the Learner in length-sorted micro-batches, each
micro-batch's token losses summed and divided by the number of completion tokens in the WHOLE batch (so the loss
and the gradient do not depend on the micro-batch split), clip, step.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
from pydantic import Field

from posttrain.config import StageConfig
from posttrain.data.sft import env_examples, file_examples, length_order
from posttrain.data.tables import data_columns_field, data_path_field
from posttrain.errors import UserError
from posttrain.runtime.context import RunContext
from posttrain.runtime.loop import StageLoop
from posttrain.stages import Cursor, StageResume, register_stage
from posttrain.train.learner import Sequences
from posttrain.train.losses import SFTLoss


class SFTConfig(StageConfig):
    """The SFT stage (plus the optimizer keys shared with [rl]: lr, weight_decay, betas, warmup_steps, schedule,
    min_lr_ratio, grad_clip, max_bad_steps)."""

    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(128, gt=0, description="Sequences per optimizer step (global).")
    micro_batch_size: int = Field(128, gt=0, description="Sequences per forward/backward (per device); only "
                                  "memory and speed depend on it, not the loss.")
    pack_tokens: int | None = Field(None, gt=0, description="Packed SFT: lay each micro-batch's examples end to "
                                    "end, without padding, in rows of at most this many tokens (an example longer "
                                    "than that gets a row of its own); attention stays within each example "
                                    "(position ids restart at 0) and the loss equals the unpacked one. On CPU it "
                                    "pays only for short examples of varied length (1.1x on the quickstart, slower on "
                                    "SmolLM2: docs/performance.md). null = one example per row, padded.")
    data_path: str | None = data_path_field("Rows of prompt and completion", unset="the environment's gold "
                                            "solutions on its train split are the data.")
    data_columns: dict[str, str] = data_columns_field("prompt and completion",
                                                      '{prompt = "question", completion = "response"}')
    eval_every: int = Field(0, ge=0, description="Greedy held-out accuracy every N steps (0 = only at the end).")
    eval_sampled: bool = Field(False, description="Make the periodic evaluations full ones (greedy, pass@k, "
                               "mean@n logged to metrics.jsonl, eval/sft-stepN.json), as RL's are: a compute "
                               "curve of the SFT stage, at the cost of sampling [eval] each time.")
    stop_at_accuracy: float | None = Field(None, gt=0, le=1, description="Stop early once the periodic greedy "
                                           "held-out accuracy reaches this (a more reliable warm-up than a fixed "
                                           "step count on tasks that are learned in a sudden jump).")


@register_stage("sft", SFTConfig, state=Cursor)
def run(ctx: RunContext, c: SFTConfig, resume: StageResume | None) -> None:
    parts, say = ctx.parts, ctx.services
    loop = StageLoop(ctx, c, resume, steps=c.steps)
    cursor = resume.state.cursor if resume else 0
    rendering = {"seed": parts.seed, "chat_template": parts.chat_template, "max_len": parts.max_len}
    source = (file_examples(Path(c.data_path), parts.tokenizer, columns=c.data_columns, **rendering) if c.data_path
              else env_examples(parts.training_env(c.env_args), parts.tokenizer, **rendering))
    stream = itertools.islice(source, cursor, None)  # the data cursor: examples already consumed
    reached = False
    for step in loop.steps():
        t0 = time.time()
        say.phase("data", f"{c.batch_size} examples from {c.data_path if c.data_path else parts.env.name}")
        batch = list(itertools.islice(stream, c.batch_size))
        if not batch:
            raise UserError(f"sft: no training examples left at step {step + 1} (the environment "
                            f"{parts.env.name!r} yields no train-split tasks)")
        cursor += len(batch)
        say.phase("train", f"forward/backward over {len(batch)} sequences")
        result = loop.learner.train_step(Sequences([e.prompt for e in batch], [e.completion for e in batch]),
                                         SFTLoss(sum(len(e.completion) for e in batch)),
                                         rows=torch.tensor(length_order(batch)), where=f"sft step {step + 1}",
                                         pack_tokens=c.pack_tokens)
        loop.trained(result)
        metrics = {"sft/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm,
                   "time/step_s": time.time() - t0, "train/examples_seen": cursor}
        say.status(f"loss {result.loss:.3f}")
        if loop.scheduled(c.eval_every):
            reached = periodic_eval(loop, c, metrics)  # before the step's row: its accuracy is in the row
        loop.log(metrics)
        if reached:
            say.note(f"sft: accuracy reached {c.stop_at_accuracy} at step {step + 1}; stopping the stage")
            break
        loop.checkpoint(Cursor(cursor))
    final = loop.end_stage(Cursor(cursor))
    if c.stop_at_accuracy is not None and not reached and final["greedy_acc"] < c.stop_at_accuracy:
        # The target exists so that the next stage starts from a model that sometimes succeeds: say it did not.
        say.note(f"warning: sft used all {c.steps} steps without reaching stop_at_accuracy = {c.stop_at_accuracy} "
                 f"(held-out greedy accuracy {final['greedy_acc']:.3f}); the next stage starts from a model that "
                 "rarely solves a task (another seed, more steps or another lr may get past the plateau)")


def periodic_eval(loop: StageLoop, c: SFTConfig, metrics: dict) -> bool:
    """The held-out greedy accuracy into the step's metrics (a full evaluation with eval_sampled, its row logged
    before the step's) -> whether it reached stop_at_accuracy."""
    if c.eval_sampled:
        acc = loop.evaluate(f"sft-step{loop.stage_step}")["greedy_acc"]
    else:
        acc = loop.evaluate("sft-periodic", greedy_only=True, log=False)["greedy_acc"]
    metrics["eval/greedy_acc"] = acc
    loop.ctx.services.note(f"sft step {loop.stage_step}: loss {metrics['sft/loss']:.3f}, held-out greedy accuracy "
                           f"{acc:.3f}")
    return c.stop_at_accuracy is not None and acc >= c.stop_at_accuracy
