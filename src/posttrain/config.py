"""Recipes: one TOML file, validated into typed config. The shared sections are here; each stage's section lives
with the stage (recipes/sft.py: SFTConfig, recipes/rl.py: RLConfig). docs/recipes.md is generated from these
models by `posttrain docs`; an unknown key, a wrong type or an impossible value is an error naming the key and
the file.

Sizes that define the algorithm (prompts per step, group size, batch size) are global; sizes that only affect
speed and memory (micro_batch_size) are per device and never change results beyond float rounding.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.errors import ConfigError, UserError


class Section(BaseModel):
    # allow_inf_nan=False: lr = inf, failure_reward = nan, score_timeout_s = inf ... are errors naming the key
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
        "choice is written to run.log).")
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

    def optimizer_args(self) -> dict[str, Any]:
        """These keys as the Learner's keyword arguments."""
        return {name: getattr(self, name) for name in OptimConfig.model_fields}


class StageConfig(OptimConfig):
    env_args: dict[str, Any] = Field(default_factory=dict, description="Overrides of env.args for this stage's "
                                     "training tasks only (e.g. an easier SFT mix or a harder RL split); "
                                     "evaluation always uses [env].")


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


class CheckpointConfig(Section):
    """Resumable checkpoints (Hugging Face format + trainer state), written atomically."""

    every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0 = at stage ends only).")
    keep_last_n: int = Field(2, gt=0, description="Rotate step checkpoints, keeping the newest N.")


class RolloutConfig(Section):
    """The rollout engine: what generates samples for RL and evaluation."""

    engine: str = Field("local", description="Rollout engine (registry rollout.ENGINES): 'local' is the in-process "
                        "sampler on the transformers model.")
    weights: Literal["auto", "shared", "copy"] = Field(
        "auto", description="How the engine gets the policy's weights. 'shared': it runs the learner's own module "
        "(local engine only; nothing to sync). 'copy': it holds its own copy, refreshed by update_weights after every "
        "update, as an out-of-process engine does. 'auto': shared where the engine can, else copy.")


class RunConfig(Section):
    """The whole recipe. Besides these keys and sections, each stage named in `recipe` has its own section
    (`[sft]`, `[rl]`, ...), validated by the config class the stage registered (posttrain/stages.py)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    recipe: list[str] = Field(description="Stages to run in order, e.g. 'sft', 'rl' or ['sft', 'rl'] "
                              "(`posttrain docs` lists the stages). Each stage starts from the previous one's model.")
    name: str = Field(description="Run name; the run directory is output_dir/name.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    seed: int = Field(0, ge=0, description="Seeds model init, data order and sampling.")
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: all cores).")
    stall_timeout_s: float = Field(900.0, gt=0, description="Report a phase (generate, score, train, ...) that "
                                   "makes no progress for this long, naming what it waits on (see heartbeat.json).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

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
        return self

    def section(self, stage: str) -> Any:
        """The validated config section of a stage in the recipe (e.g. the RLConfig of [rl])."""
        return (self.__pydantic_extra__ or {})[stage]

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """'rl.lr=1e-4' -> (['rl', 'lr'], 1e-4). The value is read as a TOML value, else as a plain string; `null`
    (TOML has none) unsets an optional key: 'sft.stop_at_accuracy=null' (quote it for the string: 'x="null"')."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected section.key=value")
    if raw.strip() == "null":
        return key.strip().split("."), None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def set_path(tree: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {'.'.join(path)}: {part!r} is not a section")
        tree = node
    tree[path[-1]] = value


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


def validate(raw: dict[str, Any], source: str = "<recipe>") -> RunConfig:
    try:
        return RunConfig.model_validate(copy.deepcopy(raw))
    except ValidationError as e:
        key, msg = _first_error(e)
        raise UserError(f"{source}: {key}: {msg}") from None
    except ConfigError as e:
        raise UserError(f"{source}: {e.key}: {e.message}") from None


def read_toml(path: Path, *, missing: str) -> dict[str, Any]:
    """A TOML file as a dict; `missing` is the message when it does not exist, bad TOML names the file."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(missing) from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    raw = read_toml(path, missing=f"{path}: recipe file not found")
    raw.setdefault("name", path.stem)
    for text in overrides or []:
        key, value = parse_override(text)
        set_path(raw, key, value)
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
    if isinstance(v, dict):  # TOML has no null: a None entry is left out (it reads back as its default, None)
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    return repr(v)
