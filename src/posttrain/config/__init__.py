"""Recipes: one TOML file, validated into typed config. The shared sections are in config/schema.py; each stage's
section lives with the stage (recipes/sft.py: SFTConfig, recipes/rl.py: RLConfig). Reading a file, the `--set`
overrides, path resolution and writing the resolved config back are config/load.py. docs/recipes.md is generated
from the models by `posttrain docs`; an unknown key, a wrong type or an impossible value is an error naming the key
and the file.
"""

from posttrain.config.load import (
    FORCE_BF16,
    is_path_key,
    load_recipe,
    parse_override,
    read_toml,
    resolve_paths,
    set_path,
    to_toml,
    validate,
)
from posttrain.config.schema import (
    CheckpointConfig,
    DistributedConfig,
    EnvConfig,
    EnvSource,
    EvalConfig,
    EvalSuite,
    LearnerConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    Section,
    StageConfig,
    TeacherConfig,
    TrackingConfig,
)

__all__ = [
    "FORCE_BF16", "CheckpointConfig", "DistributedConfig", "EnvConfig", "EnvSource", "EvalConfig", "EvalSuite",
    "LearnerConfig", "LoraConfig", "ModelConfig", "OptimConfig", "RolloutConfig", "RunConfig", "Section",
    "StageConfig", "TeacherConfig", "TrackingConfig", "is_path_key", "load_recipe", "parse_override", "read_toml",
    "resolve_paths", "set_path", "to_toml", "validate",
]
