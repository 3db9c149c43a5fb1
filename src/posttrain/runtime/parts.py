"""What a run is made of: the policy and its sampler, the environment and its scorer, the evaluator, the teacher,
and the run-wide choices every stage reads (seed, precision, context length, checkpoint cadence). The runner
builds them once from the recipe; no stage reassigns one (the policy's weights change, the parts do not)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.envs.scoring import Scorer
from posttrain.evals.evaluate import Evaluator
from posttrain.rollout.base import RolloutEngine


@dataclass(frozen=True)
class RunParts:
    run_dir: Path
    policy: Any  # the model every stage trains; each stage continues from the previous one's weights
    tokenizer: Any
    env: Any  # the run's environment ([env]): evaluation, and training unless a stage overrides its args
    env_name: str
    env_args: dict[str, Any]
    engine: RolloutEngine
    scorer: Scorer
    evaluator: Evaluator
    teacher: Any = None  # a train.learner.FrozenModel when a stage distils from [teacher]
    seed: int = 0
    bf16: bool = False
    compile: bool = False
    chat_template: bool = True
    max_len: int | None = None
    checkpoint_every: int = 0
    keep_last_n: int = 2
    max_staleness: int = 0  # rollout.max_staleness
    foreign_sampler: bool = False  # rollouts come from another kind of engine than the learner's model (vLLM)
    # Builds a stage's own rollout engine at a policy version (a copy, vLLM, Ray workers); None: the stage's
    # rollouts come from `engine`, in step with training.
    rollout_engines: Callable[[int], RolloutEngine] | None = None
    activation_checkpointing: bool = False  # learner.activation_checkpointing
    # Starts a sharded learner ([learner] world_size > 1): (policy, Learner keyword arguments) -> a LearnerGroup
    # (train/learner_group.py) with the Learner's interface; None: the stage's Learner runs in this process.
    launch_learner: Callable[[Any, dict[str, Any]], Any] | None = None

    def training_env(self, overrides: dict[str, Any]) -> Any:
        """The environment a stage trains on: [env] with the stage's env_args overrides (evaluation keeps [env])."""
        if not overrides:
            return self.env
        from posttrain.envs import make_env

        return make_env(self.env_name, {**self.env_args, **overrides})
