import tomllib
from pathlib import Path

import pytest

from posttrain.config import load_recipe, to_toml, validate
from posttrain.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_minimal_recipe_fills_defaults(tmp_path):
    cfg = load_recipe(write(tmp_path, 'recipe = ["sft", "rl"]\n'))
    assert cfg.recipe == ["sft", "rl"] and cfg.name == "r" and cfg.model.path == "tiny-3m"
    assert cfg.rl.lr == 1e-4 and cfg.sft.lr == 1e-3 and cfg.section("rl") is cfg.rl
    # every hyperparameter of the chosen entries, filled in, so the resolved config says what ran
    assert cfg.rl.policy_loss_args == {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": None}
    assert cfg.rl.advantage_args == {"eps": 1e-6}


def test_a_stage_section_exists_only_for_the_stages_in_the_recipe(tmp_path):
    cfg = load_recipe(write(tmp_path, 'recipe = "sft"\n'))
    assert list(cfg.model_dump())[-1] == "sft" and "rl" not in cfg.model_dump()


@pytest.mark.parametrize("text, key", [
    ('recipe = "sft"\n[sft]\nlearning_rate = 1e-3\n', "sft.learning_rate"),
    ('recipe = "sft"\nsede = 3\n', "sede"),
    ('recipe = "sft"\n[sft]\nlr = "fast"\n', "sft.lr"),
    ('recipe = "sft"\n[sft]\nlr = -1e-3\n', "sft.lr"),
    ('recipe = "rl"\n[rl]\ngroup_size = 0\n', "rl.group_size"),
    ('recipe = "ppo"\n', "recipe[0]"),
    ('recipe = []\n', "recipe"),
    ('recipe = "sft"\n[eval]\nsamples = 4\nks = [1, 8]\n', "eval"),
    ('recipe = "sft"\n[rl]\nsteps = 3\n', "rl"),  # a section for a stage the recipe does not run
    ('recipe = "rl"\n[rl]\neps_high = 0.3\n', "rl.eps_high"),  # moved into policy_loss_args
    ('recipe = "rl"\n[rl]\npolicy_loss_args = {eps_hgh = 0.3}\n', "rl.policy_loss_args.eps_hgh"),
    ('recipe = "rl"\n[rl]\npolicy_loss = "cispo"\npolicy_loss_args = {eps_high = 0.3}\n',
     "rl.policy_loss_args.eps_high"),
    ('recipe = "rl"\n[rl]\nadvantage_args = {eps = -1}\n', "rl.advantage_args.eps"),
    ('recipe = "rl"\n[rl]\nadvantage = "gpro"\n', "rl.advantage"),
    ('recipe = "rl"\n[rl]\ngroup_filter = "zero_var"\n', "rl.group_filter"),
    ('recipe = "rl"\n[rl]\ngroup_size = 1\n', "rl.group_size"),  # grpo is group-relative
    ('recipe = "rl"\n[rl]\npolicy_loss = "reinforce"\nentropy_target = [0.1, 0.5]\n', "rl.entropy_adapt_arg"),
    ('recipe = "rl"\n[rl]\nentropy_target = [0.1, 0.5]\nentropy_adapt_arg = "entropy_coef"\n', "rl.entropy_adapt_bounds"),
    ('recipe = "sft"\n[learner]\nworld_size = 2\nsharding = "none"\n', "learner"),
    ('recipe = "sft"\n[learner]\nworld_size = 0\n', "learner.world_size"),
    ('recipe = "sft"\n[learner]\nsharding = "none"\noffload_optimizer = true\n', "learner"),
    ('recipe = "sft"\n[learner]\nlaunch = "slurm"\n', "learner.launch"),
    ('recipe = "sft"\n[model]\nlora = {r = 4}\n[learner]\nworld_size = 2\n', "learner.world_size"),
])
def test_bad_recipes_name_the_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and key in msg and "\n" not in msg


def test_set_overrides_any_key_with_toml_values(tmp_path):
    cfg = load_recipe(write(tmp_path, 'recipe = "rl"\n'),
                      ["rl.lr=3e-5", "rl.entropy_target=[0.1, 0.5]", "model.path=/some/dir", "env.args.digits=2"])
    assert cfg.rl.lr == 3e-5 and cfg.rl.entropy_target == (0.1, 0.5)
    assert cfg.model.path == "/some/dir" and cfg.env.args == {"digits": 2}


def test_set_of_unknown_key_is_an_error(tmp_path):
    with pytest.raises(UserError, match="rl.lrr"):
        load_recipe(write(tmp_path, 'recipe = "rl"\n'), ["rl.lrr=1"])


def test_preset_supplies_defaults_and_recipe_keys_win(tmp_path):
    cfg = load_recipe(write(tmp_path, 'recipe = "rl"\n[rl]\npreset = "dapo"\npolicy_loss_args = {eps_high = 0.3}\n'))
    assert cfg.rl.group_filter == "dynamic_sampling" and cfg.rl.kl_coef == 0.0
    # the recipe overrides the preset's eps_high 0.28 and keeps its eps_low
    assert cfg.rl.policy_loss_args == {"eps_low": 0.2, "eps_high": 0.3, "dual_clip": None}
    # choosing another loss drops the preset's table for ppo_clip (it would not fit) and takes cispo's defaults
    cfg = load_recipe(write(tmp_path, 'recipe = "rl"\n[rl]\npreset = "dapo"\npolicy_loss = "cispo"\n'))
    assert cfg.rl.policy_loss_args == {"max_weight": 5.0, "min_weight": 0.0}
    with pytest.raises(UserError, match="dapoo"):
        load_recipe(write(tmp_path, 'recipe = "rl"\n[rl]\npreset = "dapoo"\n'))


def test_every_preset_validates():
    from posttrain import presets

    names = presets.names("rl")
    assert names == sorted(["grpo", "dr_grpo", "dapo", "prorl", "gspo", "cispo", "rloo", "reinforce_pp",
                            "scalerl", "opd", "kdrl"])
    from posttrain.algos import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES

    for name in names:
        rl = validate({"recipe": "rl", "name": "x", "rl": {"preset": name}, "teacher": {"path": "tiny-test"}}).rl
        assert rl.advantage in ADVANTAGES and rl.policy_loss in POLICY_LOSSES
        assert rl.aggregation in AGGREGATIONS and rl.kl_estimator in KL_ESTIMATORS


@pytest.mark.parametrize("preset", ["prorl", "scalerl", "reinforce_pp"])
def test_resolved_toml_round_trips(tmp_path, preset):
    cfg = load_recipe(write(tmp_path, f'recipe = ["sft", "rl"]\n[rl]\npreset = "{preset}"\n'))
    again = validate(tomllib.loads(to_toml(cfg)))
    assert again == cfg


def test_malformed_toml_names_the_file(tmp_path):
    path = write(tmp_path, "recipe = \n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(path)


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("*.toml")))
def test_every_shipped_recipe_and_sweep_validates(path):
    if "axes" in tomllib.loads((ROOT / path).read_text()):  # a sweep: every point is a validated recipe
        from posttrain.scaling.sweep import load_sweep

        configs = [p.cfg for p in load_sweep(ROOT / path).points]
    else:
        configs = [load_recipe(ROOT / path)]
    for cfg in configs:
        assert cfg.name and cfg.recipe and all(cfg.section(stage) is not None for stage in cfg.recipe)
