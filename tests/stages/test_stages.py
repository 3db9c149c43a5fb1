"""Stages as plugins: a stage registers its name, its config section and its run function."""

import pytest
from pydantic import Field

from posttrain.config import Section, validate
from posttrain.errors import UserError
from posttrain.stages import STAGES, load_stages, register_stage


def test_the_built_in_stages_are_found_by_listing_the_recipes_package():
    stages = load_stages()
    assert {"sft", "rl"} <= set(stages.names())
    from posttrain.recipes.rl_config import RLConfig
    from posttrain.recipes.sft import SFTConfig

    assert stages.get("rl").config is RLConfig and stages.get("sft").config is SFTConfig


def test_recipe_names_are_checked_against_the_registry():
    with pytest.raises(UserError, match=r"recipe\[1\]: 'ppo' is not a known stage; known: .*rl.*sft"):
        validate({"recipe": ["sft", "ppo"], "name": "x"})


def test_a_plugin_stage_is_one_registration_and_gets_its_own_section(tmp_path):
    class CountConfig(Section):
        """A toy stage for this test: takes `steps` no-op steps."""

        steps: int = Field(2, gt=0, description="How many.")

    seen = []

    @register_stage("count_test", CountConfig)
    def run(ctx, cfg, resume):
        seen.append((cfg.steps, resume))
        ctx.state.global_step += cfg.steps
        ctx.parts.engine.update_weights({}, ctx.state.global_step)
        ctx.checkpoint(stage_step=cfg.steps, stage_done=True, learner=None)

    try:
        cfg = validate({"recipe": ["count_test"], "name": "c", "output_dir": str(tmp_path), "threads": 1,
                        "model": {"path": "tiny-test"}, "count_test": {"steps": 3},
                        "eval": {"at_start": False}})
        assert cfg.section("count_test").steps == 3
        with pytest.raises(UserError, match="count_test.steps: Input should be greater than 0"):
            validate({"recipe": ["count_test"], "name": "c", "count_test": {"steps": 0}})
        from posttrain.runner import run as run_recipe

        summary = run_recipe(cfg)
        assert seen == [(3, None)] and summary["steps"] == 3
        assert "[count_test]" in (tmp_path / "c" / "config.toml").read_text()
    finally:
        del STAGES._entries["count_test"]
