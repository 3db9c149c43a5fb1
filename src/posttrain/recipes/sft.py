"""SFT: next-token loss on completion tokens only.

    posttrain run recipes/sft-tiny.toml

One step: take `batch_size` examples, split them into length-sorted micro-batches, sum each micro-batch's token
losses divided by the number of completion tokens in the WHOLE batch (so the loss and the gradient do not depend on
the micro-batch split), clip, step.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from posttrain.algos.logprobs import token_logprobs
from posttrain.data.sft import collate, env_examples, jsonl_examples, micro_batches
from posttrain.errors import UserError
from posttrain.models.layout import autocast
from posttrain.runtime.context import RunContext
from posttrain.tracking.ledger import FlopModel, causal
from posttrain.train.checkpoint import restore_training_state
from posttrain.train.guards import UpdateGuard
from posttrain.train.optim import build_optimizer, build_scheduler


def sft_loss(model, examples, *, total_tokens: int, pad_id: int, bf16: bool) -> torch.Tensor:
    """Sum of completion-token NLL of these examples / total_tokens of the whole batch. Call backward on it."""
    dev = model.device
    ids, attn, loss_mask = (t.to(dev) for t in collate(examples, pad_id))
    with autocast(bf16, dev):
        logits = model(input_ids=ids, attention_mask=attn).logits
    nll = -token_logprobs(logits[:, :-1], ids[:, 1:]) * loss_mask[:, 1:]  # (B, L-1)
    return nll.sum() / total_tokens


def run_stage(ctx: RunContext, stage_index: int, resume: dict | None) -> None:
    c, model, tok = ctx.cfg.sft, ctx.model, ctx.tokenizer
    model.train()
    optimizer = build_optimizer(model, lr=c.lr, weight_decay=c.weight_decay, betas=c.betas)
    scheduler = build_scheduler(optimizer, total_steps=c.steps, warmup_steps=c.warmup_steps, schedule=c.schedule,
                                min_lr_ratio=c.min_lr_ratio)
    start, cursor = restore_training_state(optimizer, scheduler, resume)

    source = (jsonl_examples(Path(c.data_path), tok, seed=ctx.cfg.seed, chat_template=ctx.cfg.model.chat_template,
                             max_len=ctx.max_len) if c.data_path else
              env_examples(ctx.training_env(c.env_args), tok, seed=ctx.cfg.seed, chat_template=ctx.cfg.model.chat_template,
                           max_len=ctx.max_len))
    stream = itertools.islice(source, cursor, None)  # the data cursor: examples already consumed
    flop_model = FlopModel.from_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    guard = UpdateGuard(c.max_bad_steps)
    step = start
    for step in ctx.progress(range(start, c.steps), total=c.steps, completed=start, description="sft"):
        t0 = time.time()
        ctx.phase("data", f"{c.batch_size} examples from {'the JSONL file' if c.data_path else ctx.env.name}")
        batch = list(itertools.islice(stream, c.batch_size))
        if not batch:
            raise UserError(f"sft: no training examples left at step {step + 1} (the environment "
                            f"{ctx.env.name!r} yields no train-split tasks)")
        cursor += len(batch)
        total_tokens = sum(len(e.completion) for e in batch)
        loss_value = 0.0
        ctx.phase("train", f"forward/backward over {len(batch)} sequences")
        for mb in micro_batches(batch, c.micro_batch_size):
            loss = sft_loss(ctx.learner, mb, total_tokens=total_tokens, pad_id=tok.pad_token_id, bf16=ctx.cfg.model.bf16)
            loss.backward()
            loss_value += loss.item()
        lr = scheduler.get_last_lr()[0]
        grad_norm = ctx.optimizer_step(params, optimizer, scheduler, guard, loss=loss_value, grad_clip=c.grad_clip,
                                       where=f"sft step {step + 1}")

        ctx.global_step += 1
        flops = flop_model.train(*causal(len(e.prompt) + len(e.completion) for e in batch))
        ctx.add(**{"train/tokens": total_tokens, "compute/flops": flops, "compute/train_flops": flops})
        metrics = {"train/loss": loss_value, "train/lr": lr, "train/grad_norm": grad_norm,
                   "time/step_s": time.time() - t0, "train/examples_seen": cursor}
        ctx.status(f"loss {loss_value:.3f}")
        stop = False
        if c.eval_every and (step + 1) % c.eval_every == 0 and step + 1 < c.steps:
            acc = ctx.evaluate("sft-periodic", stage="sft", greedy_only=True, log=False)["greedy_acc"]
            metrics["eval/greedy_acc"] = acc
            ctx.note(f"sft step {step + 1}: loss {loss_value:.3f}, held-out greedy accuracy {acc:.3f}")
            stop = c.stop_at_accuracy is not None and acc >= c.stop_at_accuracy
        ctx.write_metrics("sft", metrics)
        if stop:
            ctx.note(f"sft: accuracy reached {c.stop_at_accuracy} at step {step + 1}; stopping the stage")
            break
        if ctx.due(step + 1) and step + 1 < c.steps:
            ctx.checkpoint(stage_index=stage_index, stage_step=step + 1, stage_done=False, optimizer=optimizer,
                           scheduler=scheduler, cursor=cursor)
    ctx.evaluate("sft", stage="sft")
    ctx.checkpoint(stage_index=stage_index, stage_step=step + 1, stage_done=True, optimizer=optimizer,
                   scheduler=scheduler, cursor=cursor)
