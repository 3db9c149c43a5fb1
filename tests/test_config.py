import tomllib

import pytest

from posttrain.config import load_recipe, to_toml, validate
from posttrain.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_minimal_recipe_fills_defaults(tmp_path):
    cfg = load_recipe(write(tmp_path, 'recipe = "sft"\n'))
    assert cfg.recipe == ["sft"] and cfg.name == "r" and cfg.model.path == "tiny-3m"
    assert cfg.rl.lr == 1e-4 and cfg.sft.lr == 1e-3


@pytest.mark.parametrize("text, key", [
    ('recipe = "sft"\n[sft]\nlearning_rate = 1e-3\n', "sft.learning_rate"),
    ('recipe = "sft"\nsede = 3\n', "sede"),
    ('recipe = "sft"\n[sft]\nlr = "fast"\n', "sft.lr"),
    ('recipe = "sft"\n[sft]\nlr = -1e-3\n', "sft.lr"),
    ('recipe = "rl"\n[rl]\ngroup_size = 0\n', "rl.group_size"),
    ('recipe = "dpo"\n', "recipe"),
    ('recipe = "sft"\n[eval]\nsamples = 4\nks = [1, 8]\n', "eval"),
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
    cfg = load_recipe(write(tmp_path, 'recipe = "rl"\n[rl]\npreset = "dapo"\neps_high = 0.3\n'))
    assert cfg.rl.group_filter == "dynamic_sampling" and cfg.rl.kl_coef == 0.0
    assert cfg.rl.eps_high == 0.3  # the recipe overrides the preset's 0.28
    with pytest.raises(UserError, match="dapoo"):
        load_recipe(write(tmp_path, 'recipe = "rl"\n[rl]\npreset = "dapoo"\n'))


def test_every_preset_validates():
    from posttrain.config import PRESET_DIR

    names = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
    assert names == sorted(["grpo", "dr_grpo", "dapo", "prorl", "gspo", "cispo", "rloo", "reinforce_pp",
                            "scalerl"])
    from posttrain.algos import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES

    for name in names:
        rl = validate({"recipe": "rl", "name": "x", "rl": {"preset": name}}).rl
        assert rl.advantage in ADVANTAGES and rl.policy_loss in POLICY_LOSSES
        assert rl.aggregation in AGGREGATIONS and rl.kl_estimator in KL_ESTIMATORS


def test_resolved_toml_round_trips(tmp_path):
    cfg = load_recipe(write(tmp_path, 'recipe = ["sft", "rl"]\n[rl]\npreset = "prorl"\n'))
    again = validate(tomllib.loads(to_toml(cfg)))
    assert again == cfg


def test_malformed_toml_names_the_file(tmp_path):
    path = write(tmp_path, "recipe = \n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(path)
