"""The [rl] section: RLConfig, its presets (posttrain/presets/rl/*.toml) and the checks that run at load time.

Method choices are registry names with their hyperparameter tables; a preset is a set of such keys. Every check
here runs when the recipe is loaded, not when the RL stage starts (possibly after a long SFT stage).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from posttrain.algos import (
    ADVANTAGES,
    AGGREGATIONS,
    GROUP_FILTERS,
    IS_CORRECTIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    annealed_coef,
)
from posttrain.algos.credit import CREDIT
from posttrain.config import StageConfig
from posttrain.data.samplers import SAMPLERS
from posttrain.errors import ConfigError
from posttrain.presets import PresetKeys

# Keys that became per-entry hyperparameters; a recipe that still sets one gets told where it went.
MOVED = {"eps_low": "rl.policy_loss_args", "eps_high": "rl.policy_loss_args", "dual_clip": "rl.policy_loss_args",
         "adv_eps": "rl.advantage_args (as eps)"}
RENAMED = {"eps_high_bounds": "rl.entropy_adapt_bounds"}
ENTRY_KEYS = {"advantage": "advantage_args", "policy_loss": "policy_loss_args", "sampler": "sampler_args",
              "credit": "credit_args"}


class RLConfig(StageConfig, PresetKeys):
    """The RL stage. Method choices are registry names with their hyperparameter tables; `preset` fills them
    from a named method (posttrain/presets/rl/*.toml)."""

    preset_section: ClassVar[str] = "rl"
    preset_entry_tables: ClassVar[dict[str, str]] = ENTRY_KEYS

    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    preset: str | None = Field(None, description="A named method (grpo, dr_grpo, dapo, prorl, gspo, cispo, rloo, "
                               "reinforce_pp, scalerl; with a [teacher]: opd, kdrl): a TOML file in posttrain/presets/rl whose keys become the "
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
    sampler: str = Field("uniform", description="Where prompts come from (registry data.samplers.SAMPLERS).")
    sampler_args: dict[str, Any] = Field(default_factory=dict, description="Hyperparameters of the sampler.")
    advantage: str = Field("grpo", description="Advantage estimator (registry algos.ADVANTAGES), or an import "
                           "path 'pkg.module:function'.")
    advantage_args: dict[str, Any] = Field(default_factory=dict, description="Hyperparameters of the advantage "
                                           "estimator (e.g. {eps = 1e-6}); `posttrain docs` lists each entry's.")
    credit: str = Field("episode", description="Credit assignment over a multi-turn episode's turns (registry "
                        "algos.credit.CREDIT): 'episode' gives every policy token the episode reward's advantage; "
                        "'per_turn' each turn its discounted return-to-go's, against the group's episodes that "
                        "reached that turn. Single-turn samples get the estimator's advantage under either.")
    credit_args: dict[str, Any] = Field(default_factory=dict, description="Hyperparameters of the credit "
                                        "assignment (per_turn: gamma).")
    policy_loss: str = Field("ppo_clip", description="Per-token policy loss (registry algos.POLICY_LOSSES), or an "
                             "import path.")
    policy_loss_args: dict[str, Any] = Field(default_factory=dict, description="Hyperparameters of the policy loss "
                                             "(ppo_clip: eps_low, eps_high, dual_clip; cispo: max_weight, ...).")
    aggregation: str = Field("token_mean", description="Loss aggregation (registry algos.AGGREGATIONS).")
    kl_estimator: str = Field("k3", description="KL estimator (registry algos.KL_ESTIMATORS).")
    kl_coef: float = Field(0.0, ge=0, description="KL coefficient; 0 disables the reference model.")
    kl_placement: Literal["loss", "reward"] = Field(
        "loss", description="KL as a loss term, or as per-token rewards -kl_coef * KL_t (a sequence-level "
        "advantage sees their sum; reinforce_pp sees the reward-to-go).")
    teacher_kl_coef: float = Field(0.0, ge=0, description="KDRL (arXiv 2506.02208): weight β of a KL(policy || "
                                   "teacher) loss term on the student's samples, beside the verifier's advantage; "
                                   "needs [teacher]. 0: off.")
    teacher_kl_final_coef: float | None = Field(None, ge=0, description="Anneal β from teacher_kl_coef to this "
                                                "over the stage's steps (KDRL: 5e-3 -> 1e-3); null: constant.")
    teacher_kl_schedule: Literal["linear", "cosine"] = Field("linear", description="Shape of the β anneal.")
    teacher_kl_estimator: str = Field("k2", description="KL estimator of the teacher term (registry "
                                      "algos.KL_ESTIMATORS). k2's gradient is the reverse-KL gradient; k3's is the "
                                      "forward KL's (algos/distill.py).")
    teacher_kl_mask: Literal["all", "failed"] = Field("all", description="Which samples carry the teacher term: "
                                                      "all, or only those the verifier failed (KDRL's "
                                                      "reward-guided masking).")
    is_correction: str = Field("none", description="Sampler-vs-trainer importance correction "
                               "(registry algos.IS_CORRECTIONS: none, tis, mask, seq_tis, seq_mask).")
    is_cap: float = Field(2.0, gt=0, description="Cap C for the IS correction.")
    entropy_coef: float = Field(0.0, description="Entropy bonus coefficient (loss -= coef * entropy).")
    forking_fraction: float = Field(1.0, gt=0, le=1, description="Forking tokens (Wang et al., arXiv "
                                    "2506.01939): the policy-gradient term trains only on this fraction of each "
                                    "micro-batch's valid tokens, those of highest policy entropy (0.2 in the "
                                    "paper); the KL and entropy terms keep every token, and the normalisers "
                                    "still count every token, so the update is the full one's with the "
                                    "low-entropy tokens' terms set to 0. Logs pg/forking_frac (the fraction "
                                    "that trained) and pg/forking_entropy (their mean entropy; pg/entropy is "
                                    "every token's). 1 = every token (off).")
    group_filter: str = Field("none", description="Which groups train (registry algos.GROUP_FILTERS): none, "
                              "zero_variance (drop groups whose rewards are all equal, ScaleRL), dynamic_sampling "
                              "(drop them and generate more prompts until the batch is full, DAPO).")
    max_refill_rounds: int = Field(3, ge=0, description="dynamic_sampling: extra generation rounds per step.")
    log_samples: int = Field(4, ge=0, description="completions per step written to samples.jsonl (prompt and "
                             "completion text with special tokens, token ids, reward, finish reason); 0: none.")
    overlong_cache: int = Field(0, ge=0, description="DAPO soft overlong penalty buffer L_cache in tokens "
                                "(0 = off); the penalty ramps over the last L_cache tokens of max_new_tokens.")
    mask_truncated: bool = Field(False, description="Exclude completions cut by max_new_tokens from the loss.")
    entropy_target: tuple[float, float] | None = Field(None, description="ProRL-style controller: keep the "
                                                       "policy entropy inside [low, high] by adapting the policy "
                                                       "loss hyperparameter entropy_adapt_arg.")
    entropy_adapt_arg: str = Field("eps_high", description="What the entropy controller adapts: a hyperparameter "
                                   "of the policy loss (eps_high: Clip-Higher as a feedback loop), or "
                                   "'entropy_coef', the entropy bonus itself (an adaptive entropy coefficient, "
                                   "starting at rl.entropy_coef; set entropy_adapt_bounds to its range, e.g. "
                                   "[0, 0.01]).")
    entropy_adapt_step: float = Field(0.02, gt=0, description="Controller step per RL step.")
    entropy_adapt_bounds: tuple[float, float] = Field((0.2, 0.5), description="Controller limits on the "
                                                      "adapted hyperparameter.")
    ref_reset_every: int = Field(0, ge=0, description="Reset the reference policy to the current one every N "
                                 "steps (ProRL; 0 = never).")
    ref_reset_patience: int = Field(0, ge=0, description="Also reset when held-out reward has not improved for "
                                    "this many evaluations (0 = off).")
    ref_reset_kl: float = Field(0.0, ge=0, description="Also reset when a step's measured KL to the reference "
                                "(kl/value, measured where kl_coef > 0) exceeds this (ProRL's trigger; 0 = off).")
    ref_reset_optimizer: bool = Field(False, description="Re-initialise the optimizer state on a reference reset.")
    eval_every: int = Field(0, ge=0, description="Held-out evaluation every N RL steps (0 = only at the end).")
    skip_zero_advantage: bool = Field(True, description="Skip the forward/backward of samples whose advantage is "
                                      "exactly 0 (their gradient is exactly 0; normalisers still count them). "
                                      "Ignored when an entropy bonus or a KL loss term gives them a gradient; with "
                                      "a teacher KL term, only samples it does not cover (teacher_kl_mask) skip.")
    mismatch_check_every: int = Field(16, ge=0, description="When old logprobs are the sampler's (not recomputed), "
                                      "recompute the learner's logprobs for 1 completion in N every step and log "
                                      "how far the engine's are from them (is/mismatch_kl, is/logprob_diff_mean "
                                      "and _max, is/mismatch_rows; its FLOPs in compute/mismatch_flops): the PPO "
                                      "denominators are the engine's, so their error is measured, not assumed. "
                                      "0 = off.")
    recompute_old_logprobs: bool | None = Field(None, description="Recompute old logprobs with a learner forward "
                                                "pass instead of using the sampler's (needed when the sampler's "
                                                "numerics differ from the learner's: another engine, bf16 rollouts). "
                                                "Logs the engine-vs-learner mismatch every step: is/mismatch_kl (k3), "
                                                "is/logprob_diff_mean and _max. Default: on when rollout.engine is "
                                                "not 'local' (vLLM), else off. With rollout.max_staleness > 0, true "
                                                "together with is_correction = 'tis' is decoupled PPO (clip against "
                                                "the current policy, IS weight to the stale sampler); off, the PPO "
                                                "ratio to the sampler's logprobs does the correcting.")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key, where in MOVED.items():
            if key in data:
                raise ConfigError(f"rl.{key}", f"moved to {where} (each policy loss and advantage now declares "
                                  "its own hyperparameters; `posttrain docs` lists them)")
        for key, new in RENAMED.items():
            if key in data:
                raise ConfigError(f"rl.{key}", f"renamed to {new}")
        return data

    @model_validator(mode="after")
    def _registry_entries(self) -> RLConfig:
        # Checked at load time, not when the RL stage starts (possibly after a long SFT stage).
        for key, registry in (("aggregation", AGGREGATIONS), ("kl_estimator", KL_ESTIMATORS),
                              ("teacher_kl_estimator", KL_ESTIMATORS),
                              ("is_correction", IS_CORRECTIONS), ("group_filter", GROUP_FILTERS)):
            name = getattr(self, key)
            if ":" not in name and name not in registry:
                raise ConfigError(f"rl.{key}", f"{name!r} is not one of {', '.join(registry.names())}")
        for entry, registry in (("advantage", ADVANTAGES), ("policy_loss", POLICY_LOSSES), ("sampler", SAMPLERS),
                                ("credit", CREDIT)):
            name, table = getattr(self, entry), ENTRY_KEYS[entry]
            if ":" not in name and name not in registry:
                raise ConfigError(f"rl.{entry}", f"{name!r} is not one of {', '.join(registry.names())} "
                                  "(or an import path 'pkg.module:name')")
            # The resolved config shows every hyperparameter, defaults filled in.
            self.__dict__[table] = registry.validate_args(name, getattr(self, table), key=f"rl.{table}")
        if self.group_size == 1 and ADVANTAGES.trait(self.advantage, "group_relative"):
            raise ConfigError("rl.group_size", f"1 with advantage {self.advantage!r}, which is group-relative "
                              "(its baseline is the other samples of the same prompt): every advantage would be 0 "
                              "and nothing would train; use group_size >= 2, or advantage = 'reinforce_pp'")
        mixed = self.advantage_args.get("reward_advantage")
        if mixed is not None and ":" not in mixed and mixed not in ADVANTAGES:
            raise ConfigError("rl.advantage_args.reward_advantage", f"{mixed!r} is not one of "
                              f"{', '.join(ADVANTAGES.names())}")
        if (self.entropy_target is not None and self.entropy_adapt_arg == "entropy_coef"
                and "entropy_adapt_bounds" not in self.model_fields_set):
            raise ConfigError("rl.entropy_adapt_bounds", "the entropy controller adapts entropy_coef: give its range "
                              "(e.g. [0.0, 0.01]); the default [0.2, 0.5] is eps_high's and would set an entropy "
                              "bonus of 0.2 at the first step outside the band")
        if (self.entropy_target is not None and self.entropy_adapt_arg != "entropy_coef"
                and self.entropy_adapt_arg not in self.policy_loss_args):
            raise ConfigError("rl.entropy_adapt_arg", f"the entropy controller adapts {self.entropy_adapt_arg!r}, "
                              f"but policy loss {self.policy_loss!r} has no such hyperparameter; it has: "
                              f"{', '.join(self.policy_loss_args) or 'none'}")
        if (self.ref_reset_every or self.ref_reset_patience or self.ref_reset_kl) and self.kl_coef <= 0:
            key = next(k for k in ("ref_reset_every", "ref_reset_patience", "ref_reset_kl") if getattr(self, k))
            raise ConfigError(f"rl.{key}", "resets the reference policy, which exists only with a KL term: set "
                              "rl.kl_coef > 0, or remove it")
        return self

    def updates_per_step(self) -> int:
        return self.epochs * self.mini_batches

    def teacher_keys(self) -> list[str]:
        """The keys of this section that use the teacher (the recipe must then have a [teacher])."""
        keys = ["advantage"] if ADVANTAGES.trait(self.advantage, "needs_teacher") else []
        return keys + (["teacher_kl_coef"] if self.teacher_kl_coef > 0 else [])

    def teacher_coef(self, step: int) -> float:
        """β of the teacher KL term at stage step `step` (0-based)."""
        return annealed_coef(self.teacher_kl_coef, self.teacher_kl_final_coef, step, self.steps,
                             self.teacher_kl_schedule)
