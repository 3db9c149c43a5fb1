"""What every stage of a run shares, split by how often it changes:

    ctx.parts     RunParts (runtime/parts.py): policy, tokenizer, env, engine, scorer, evaluator, teacher, and the
                  run-wide choices (seed, precision, context length, checkpoint cadence); built once, never reassigned
    ctx.services  Services (runtime/services.py): notes, phases (heartbeat), the progress bar
    ctx.ledger    Ledger (runtime/ledger.py): the running totals (FLOPs by kind, tokens)
    ctx.state     RunState (runtime/state.py): global step, stage, elapsed time, evaluations, a stop request

and what needs several of them: a stage's Learner and rollout stream, the metric row, samples.jsonl, the
checkpoint and the evaluation. The runner (runner.py) builds every part from the config; nothing here reads the
recipe except `learner`, which takes a stage section's optimizer keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import RunStopped
from posttrain.evals.evaluate import headline_metrics, write_eval
from posttrain.rollout.base import RolloutEngine
from posttrain.rollout.producer import Rollouts
from posttrain.runtime.ledger import Ledger
from posttrain.runtime.parts import RunParts
from posttrain.runtime.services import Services
from posttrain.runtime.state import RunState
from posttrain.tracking.metrics import MetricsLog, memory_mb
from posttrain.tracking.samples import SampleLog
from posttrain.train.checkpoint import TrainerState, rng_state, rotate, save_checkpoint
from posttrain.train.learner import Learner


@dataclass
class RunContext:
    parts: RunParts
    services: Services
    ledger: Ledger
    state: RunState
    log: MetricsLog  # metrics.jsonl (and TensorBoard / W&B)
    samples: SampleLog | None = None  # samples.jsonl

    def __post_init__(self) -> None:
        self._group: Any = None

    # -- a stage's learner and rollouts -------------------------------------------------------------------------
    def learner(self, c: Any, *, total_updates: int) -> Learner:
        """A Learner over the run's policy for a stage section `c` (a config.StageConfig with micro_batch_size):
        its optimizer keys and token budget, the run's padding, precision and compile choice. With a sharded
        learner, a LearnerGroup of ranks (the previous stage's ranks are stopped first)."""
        p = self.parts
        args = dict(**c.optimizer_args(), total_updates=total_updates, micro_batch_size=c.micro_batch_size,
                    micro_batch_tokens=c.token_budget(p.policy.device.type), pad_id=p.tokenizer.pad_token_id,
                    bf16=p.bf16, compile=p.compile, activation_checkpointing=p.activation_checkpointing)
        if p.launch_learner is None:
            return Learner(p.policy, **args)
        self.close_learner()
        self.services.phase("learner", "starting the learner ranks")
        self._group = p.launch_learner(p.policy, args)
        return self._group

    def close_learner(self) -> None:
        """Stop a sharded learner's ranks (the runner calls it when the run ends, however it ends)."""
        group, self._group = self._group, None
        if group is not None:
            group.close()

    def rollouts(self, make_batches: Callable[[RolloutEngine], Iterator[Any]]) -> Rollouts:
        """A stage's rollout stream (rollout/producer.py): `make_batches(engine)` is its collect() generator."""
        p, step = self.parts, self.state.global_step
        if p.rollout_engines is None:
            return Rollouts(make_batches, p.engine, max_staleness=0, version=step, own_engine=False)
        engine = p.rollout_engines(step)
        if hasattr(engine, "on_note"):  # Ray workers report restarts in the run log
            engine.on_note = self.services.note
        return Rollouts(make_batches, engine, max_staleness=p.max_staleness, version=step, own_engine=True)

    # -- what the run writes ------------------------------------------------------------------------------------
    def write_metrics(self, stage: str, metrics: dict[str, Any]) -> None:
        row = {"step": self.state.global_step, "stage": stage, "time/elapsed_s": round(self.state.elapsed(), 3)}
        row.update(self.ledger.totals)
        row.update(metrics)
        row.update(memory_mb())
        self.log.log(row)

    def record_samples(self, batch: Any, n: int) -> None:
        """n of this step's scored samples, spread over the batch (so over its groups), into samples.jsonl."""
        if self.samples is None or n <= 0 or not len(batch):
            return
        picks = range(0, len(batch), max(1, len(batch) // n))[:n]
        decode = self.parts.tokenizer.decode
        self.samples.log([{"step": self.state.global_step + 1, "stage": self.state.stage, "task": batch.tasks[i].id,
                           "prompt": decode(batch.prompts[i]), "completion": decode(batch.completions[i].token_ids),
                           "token_ids": list(batch.completions[i].token_ids),
                           "reward": batch.scores[i].reward, "correct": batch.scores[i].correct,
                           "info": batch.scores[i].info, "finish_reason": batch.completions[i].finish_reason,
                           "policy_version": batch.completions[i].policy_version} for i in picks])

    def close(self) -> None:
        """Close the run's files and stop its learner ranks (the runner calls it however the run ends)."""
        self.services.heartbeat.close()
        self.log.close()
        if self.samples is not None:
            self.samples.close()
        self.close_learner()

    # -- checkpoints and stops ----------------------------------------------------------------------------------
    def checkpoint(self, *, stage_step: int, stage_done: bool, learner: dict[str, Any] | None,
                   stage_state: dict[str, Any] | None = None) -> Path:
        """A checkpoint of the running stage (runtime/loop.py writes the stages' own)."""
        p, s = self.parts, self.state
        state = TrainerState(global_step=s.global_step, stage_index=s.stage_index, stage_step=stage_step,
                             stage_done=stage_done, learner=learner, stage=stage_state or {}, rng=rng_state(),
                             totals=dict(self.ledger.totals), elapsed_s=s.elapsed(), evals=s.evals,
                             metrics_offset=self.log.offset())
        self.services.phase("checkpoint", f"writing step_{s.global_step}")
        path = save_checkpoint(p.run_dir / "checkpoints", s.global_step, p.policy, p.tokenizer, state)
        rotate(p.run_dir / "checkpoints", p.keep_last_n)
        return path

    def due(self, stage_step: int) -> bool:
        """A checkpoint is scheduled at this step, or the run was asked to stop (then it checkpoints now)."""
        every = self.parts.checkpoint_every
        return self.state.stop_requested is not None or (every > 0 and stage_step % every == 0)

    def stop_if_requested(self) -> None:
        """Call at the end of a step, after its checkpoint: a requested stop ends the run here, nothing lost."""
        if self.state.stop_requested is not None:
            message = (f"stopped by {self.state.stop_requested} after step {self.state.global_step}; a checkpoint "
                       "was written: re-run the same command to resume")
            self.services.note(message)
            raise RunStopped(message)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, tag: str, *, stage: str, greedy_only: bool = False, log: bool = True) -> dict[str, Any]:
        p, s = self.parts, self.state
        if p.engine.version != s.global_step:  # a stage forgot update_weights: the numbers would be stale
            raise RuntimeError(f"evaluation '{tag}' would sample weights of version {p.engine.version}, but the "
                               f"policy is at version {s.global_step}; call engine.update_weights first")
        e = p.evaluator
        t0 = time.time()
        self.services.phase("eval", f"{e.problems} problems x {e.samples} samples")
        result = e(greedy_only=greedy_only)
        result.update({"tag": tag, "step": s.global_step, "stage": stage})
        for warning in [*result.get("warnings", []),
                        *(w for suite in result.get("suites", {}).values() for w in suite.get("warnings", []))]:
            self.services.note(warning)  # e.g. fewer distinct problems than asked (it says "warning: " itself)
        if not greedy_only:
            write_eval(p.run_dir / "eval" / f"{tag}.json", result)
            s.evals[tag] = dict(headline_metrics(result))
        if log:
            self.write_metrics(stage, {**headline_metrics(result), "time/eval_s": time.time() - t0})
        return result
