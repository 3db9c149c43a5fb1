"""Recipes: one TOML file, validated into typed config. Every key is documented here (docs/recipes.md is generated
from these models by `posttrain docs`); an unknown key, a wrong type or an impossible value is an error naming
the key and the file.

Sizes that define the algorithm (prompts per step, group size, batch size) are global; sizes that only affect
speed and memory (micro_batch_size) are per device and never change results beyond float rounding.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    bf16: bool = Field(False, description="bf16 autocast for forward/backward and generation (fp32 master weights, "
                       "fp32 logprobs and losses). About 1.5-6x faster on CPUs with bf16 matrix units.")
    compile: bool = Field(False, description="torch.compile the learner's forward/backward (dynamic shapes). Costs "
                          "one compilation per run (about 1.5-3.5 min on a 2-core CPU), then made tiny-25m's RL "
                          "training pass ~1.6x faster (docs/performance.md): worth it for long runs, not for the "
                          "quickstart. Generation and checkpoints use the uncompiled module.")


class EnvConfig(Section):
    """The environment: where tasks come from and how completions are scored (training and evaluation)."""

    name: str = Field("arithmetic", description="Environment: a registered name (`posttrain envs` lists them), an "
                      "entry point in group posttrain.envs, or an import path 'pkg.module:Class'.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the environment "
                                 "(e.g. {digits = 3} for arithmetic). An argument it does not take is an error.")
    score_timeout_s: float = Field(10.0, gt=0, description="Per-completion verifier time limit; a verifier that "
                                   "raises, hangs or returns a non-number scores failure_reward instead.")
    failure_reward: float = Field(0.0, description="Reward given to a completion whose verifier failed.")
    max_error_frac: float = Field(0.5, ge=0, le=1, description="Stop the run when more than this fraction of a "
                                  "step's completions could not be scored (training on garbage otherwise).")


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


class StageConfig(OptimConfig):
    env_args: dict[str, Any] = Field(default_factory=dict, description="Overrides of env.args for this stage's "
                                     "training tasks only (e.g. an easier SFT mix or a harder RL split); "
                                     "evaluation always uses [env].")


class SFTConfig(StageConfig):
    """The SFT stage (plus the optimizer keys shared with [rl]: lr, weight_decay, betas, warmup_steps, schedule,
    min_lr_ratio, grad_clip)."""

    steps: int = Field(300, gt=0, description="Optimizer steps.")
    batch_size: int = Field(128, gt=0, description="Sequences per optimizer step (global).")
    micro_batch_size: int = Field(128, gt=0, description="Sequences per forward/backward (per device); only "
                                  "memory and speed depend on it, not the loss.")
    data_path: str | None = Field(None, description="JSONL of {\"prompt\": ..., \"completion\": ...}. When unset, "
                                  "the environment's gold solutions on its train split are the data.")
    eval_every: int = Field(0, ge=0, description="Greedy held-out accuracy every N steps (0 = only at the end).")
    stop_at_accuracy: float | None = Field(None, gt=0, le=1, description="Stop early once the periodic greedy "
                                           "held-out accuracy reaches this (a more reliable warm-up than a fixed "
                                           "step count on tasks that are learned in a sudden jump).")


class EvalConfig(Section):
    """Held-out evaluation at the start (optional) and end of every stage, and periodically if asked."""

    problems: int = Field(200, gt=0, description="Held-out problems (eval split) per evaluation.")
    samples: int = Field(8, gt=0, description="Samples per problem for pass@k / mean@n / maj@n.")
    ks: list[int] = Field(default_factory=lambda: [1, 8], description="k values for pass@k (each <= samples).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature for the sampled metrics.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling for the sampled metrics.")
    max_new_tokens: int = Field(32, gt=0, description="Generation budget per completion.")
    at_start: bool = Field(True, description="Also evaluate the starting model (the 'before' of before/after).")

    @model_validator(mode="after")
    def _ks_fit_samples(self) -> EvalConfig:
        bad = [k for k in self.ks if k < 1 or k > self.samples]
        if bad:
            raise ValueError(f"ks: every k must be in [1, samples={self.samples}], got {bad}")
        return self


class RLConfig(StageConfig):
    """The RL stage. Method choices are registry names; `preset` fills them from a named method."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    preset: str | None = Field(None, description="A named method (grpo, dr_grpo, dapo, prorl, gspo, cispo, rloo, "
                               "reinforce_pp, scalerl): a TOML file in posttrain/presets whose keys become the "
                               "defaults of this section; keys set here override it.")
    steps: int = Field(200, gt=0, description="RL steps (one rollout batch each).")
    prompts_per_step: int = Field(32, gt=0, description="Distinct prompts per step (global).")
    group_size: int = Field(8, gt=0, description="Completions sampled per prompt.")
    temperature: float = Field(1.0, gt=0, description="Rollout temperature; logprobs use the same temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Rollout nucleus sampling.")
    top_k: int = Field(0, ge=0, description="Rollout top-k (0 = off).")
    max_new_tokens: int = Field(32, gt=0, description="Generation budget per completion (L_max).")
    mini_batches: int = Field(1, gt=0, description="Optimizer steps per rollout batch (the batch is split into "
                              "this many mini-batches of whole groups). >1 makes training off-policy.")
    epochs: int = Field(1, gt=0, description="Passes over the rollout batch (PPO epochs).")
    micro_batch_size: int = Field(256, gt=0, description="Sequences per forward/backward (per device).")
    advantage: str = Field("grpo", description="Advantage estimator (registry algos.ADVANTAGES).")
    adv_eps: float = Field(1e-6, gt=0, description="Epsilon added to std in std-normalised advantages.")
    policy_loss: str = Field("ppo_clip", description="Per-token policy loss (registry algos.POLICY_LOSSES).")
    eps_low: float = Field(0.2, ge=0, description="Lower clip range: ratio >= 1 - eps_low.")
    eps_high: float = Field(0.2, ge=0, description="Upper clip range: ratio <= 1 + eps_high (DAPO clip-higher).")
    dual_clip: float | None = Field(None, gt=1, description="Dual-clip constant c for negative advantages.")
    aggregation: str = Field("token_mean", description="Loss aggregation (registry algos.AGGREGATIONS).")
    kl_estimator: str = Field("k3", description="KL estimator (registry algos.KL_ESTIMATORS).")
    kl_coef: float = Field(0.0, ge=0, description="KL coefficient; 0 disables the reference model.")
    kl_placement: Literal["loss", "reward"] = Field("loss", description="KL as a loss term, or subtracted "
                                                    "(summed over tokens) from the sequence reward.")
    is_correction: str = Field("none", description="Sampler-vs-trainer importance correction "
                               "(registry algos.IS_CORRECTIONS: none, tis, mask, seq_tis, seq_mask).")
    is_cap: float = Field(2.0, gt=0, description="Cap C for the IS correction.")
    entropy_coef: float = Field(0.0, description="Entropy bonus coefficient (loss -= coef * entropy).")
    group_filter: Literal["none", "zero_variance", "dynamic_sampling"] = Field(
        "none", description="zero_variance drops groups whose rewards are all equal (ScaleRL); dynamic_sampling "
        "drops them and generates more prompts until the batch is full (DAPO).")
    max_refill_rounds: int = Field(3, ge=0, description="dynamic_sampling: extra generation rounds per step.")
    overlong_cache: int = Field(0, ge=0, description="DAPO soft overlong penalty buffer L_cache in tokens "
                                "(0 = off); the penalty ramps over the last L_cache tokens of max_new_tokens.")
    mask_truncated: bool = Field(False, description="Exclude completions cut by max_new_tokens from the loss.")
    entropy_target: tuple[float, float] | None = Field(None, description="ProRL-style controller: keep the "
                                                       "policy entropy inside [low, high] by adapting eps_high.")
    entropy_adapt_step: float = Field(0.02, gt=0, description="Controller step on eps_high per RL step.")
    eps_high_bounds: tuple[float, float] = Field((0.2, 0.5), description="Controller limits on eps_high.")
    ref_reset_every: int = Field(0, ge=0, description="Reset the reference policy to the current one every N "
                                 "steps (ProRL; 0 = never).")
    ref_reset_patience: int = Field(0, ge=0, description="Also reset when held-out reward has not improved for "
                                    "this many evaluations (0 = off).")
    ref_reset_optimizer: bool = Field(False, description="Re-initialise the optimizer state on a reference reset.")
    eval_every: int = Field(0, ge=0, description="Held-out evaluation every N RL steps (0 = only at the end).")
    skip_zero_advantage: bool = Field(True, description="Skip the forward/backward of samples whose advantage is "
                                      "exactly 0 (their gradient is exactly 0; normalisers still count them). "
                                      "Ignored when an entropy bonus or a KL loss term gives them a gradient.")
    recompute_old_logprobs: bool = Field(False, description="Recompute old logprobs with a learner forward pass "
                                         "instead of using the sampler's (needed only if the sampler's numerics "
                                         "differ from the learner's, e.g. vLLM or bf16 rollouts).")


    @model_validator(mode="after")
    def _registry_names_exist(self) -> RLConfig:
        # Checked at load time, not when the RL stage starts (possibly after a long SFT stage).
        from posttrain.algos import ADVANTAGES, AGGREGATIONS, IS_CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES

        for key, registry in (("advantage", ADVANTAGES), ("policy_loss", POLICY_LOSSES),
                              ("aggregation", AGGREGATIONS), ("kl_estimator", KL_ESTIMATORS),
                              ("is_correction", IS_CORRECTIONS)):
            if getattr(self, key) not in registry:
                raise ValueError(f"{key} = {getattr(self, key)!r} is not one of {', '.join(registry.names())}")
        return self


class CheckpointConfig(Section):
    """Resumable checkpoints (Hugging Face format + trainer state), written atomically."""

    every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0 = at stage ends only).")
    keep_last_n: int = Field(2, gt=0, description="Rotate step checkpoints, keeping the newest N.")


class RunConfig(Section):
    recipe: list[Literal["sft", "rl"]] = Field(description="Stages to run in order, e.g. 'sft', 'rl' or "
                                               "['sft', 'rl']. Each stage starts from the previous one's model.")
    name: str = Field(description="Run name; the run directory is output_dir/name.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    seed: int = Field(0, description="Seeds model init, data order and sampling.")
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: all cores).")
    stall_timeout_s: float = Field(900.0, gt=0, description="Report a phase (generate, score, train, ...) that "
                                   "makes no progress for this long, naming what it waits on (see heartbeat.json).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @field_validator("recipe", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """'rl.lr=1e-4' -> (['rl', 'lr'], 1e-4). The value is read as a TOML value, else as a plain string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {'.'.join(path)}: {part!r} is not a section")
        tree = node
    tree[path[-1]] = value


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
        raise UserError(f"rl.preset={name!r} is not a known preset; known: {', '.join(known)}")
    with path.open("rb") as f:
        return tomllib.load(f)


def _apply_preset(raw: dict[str, Any]) -> None:
    rl = raw.get("rl")
    if isinstance(rl, dict) and rl.get("preset"):
        preset = load_preset(rl["preset"])
        raw["rl"] = {**preset, **rl}


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; `posttrain docs` lists every key)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def validate(raw: dict[str, Any], source: str = "<recipe>") -> RunConfig:
    raw = copy.deepcopy(raw)
    _apply_preset(raw)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(_format_error(source, e)) from None


def read_toml(path: Path, *, missing: str) -> dict[str, Any]:
    """A TOML file as a dict; `missing` is the message when it does not exist, bad TOML names the file."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(missing) from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    raw = read_toml(path, missing=f"{path}: recipe file not found")
    raw.setdefault("name", path.stem)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(raw, key, value)
    return validate(raw, str(path))


def to_toml(cfg: RunConfig) -> str:
    """The resolved config (every default filled in) as TOML."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    lines: list[str] = []
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for k, v in top.items():
        lines.append(f"{k} = {_toml_value(v)}")
    for section, body in data.items():
        if not isinstance(body, dict):
            continue
        lines.append(f"\n[{section}]")
        for k, v in body.items():
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)
