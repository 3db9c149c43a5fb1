from typing import Annotated

import pytest
import torch
from pydantic import Field

from posttrain import algos
from posttrain.errors import ConfigError, UserError
from posttrain.registry import Registry


def test_register_get_names_contains():
    reg: Registry = Registry("widget")

    @reg.register("b")
    def b() -> int:
        return 2

    @reg.register("a")
    def a() -> int:
        return 1

    assert reg.get("a") is a and reg["b"] is b
    assert reg.names() == ["a", "b"]
    assert "a" in reg and "c" not in reg
    assert list(reg) == ["a", "b"] and len(reg) == 2


def test_unknown_name_is_user_error_naming_kind_name_and_known():
    reg: Registry = Registry("widget")
    reg.register("alpha")(lambda: 0)
    reg.register("beta")(lambda: 0)
    with pytest.raises(UserError) as e:
        reg.get("gamma")
    assert str(e.value) == "unknown widget 'gamma'; known: alpha, beta (or an import path 'package.module:name')"


def test_duplicate_registration_is_a_bug():
    reg: Registry = Registry("widget")
    reg.register("x")(lambda: 0)
    with pytest.raises(ValueError, match="'x' is already registered"):
        reg.register("x")(lambda: 1)


def test_traits_are_registered_facts_about_an_entry():
    reg: Registry = Registry("widget")
    reg.register("g", group_relative=True)(lambda: 0)
    reg.register("p")(lambda: 0)
    assert reg.trait("g", "group_relative") is True
    assert reg.trait("p", "group_relative", False) is False
    assert algos.ADVANTAGES.trait("grpo", "group_relative") and not algos.ADVANTAGES.trait("reinforce_pp",
                                                                                          "group_relative")
    assert algos.GROUP_FILTERS.trait("dynamic_sampling", "refill") and not algos.GROUP_FILTERS.trait(
        "zero_variance", "refill")


def test_hyperparameters_are_the_keyword_only_arguments_validated_with_key_names():
    reg: Registry = Registry("widget")

    @reg.register("w")
    def w(x, *, scale: Annotated[float, Field(gt=0)] = 1.0, name: str = "a") -> float:
        return x * scale

    assert reg.validate_args("w", {}, key="rl.w_args") == {"scale": 1.0, "name": "a"}
    assert reg.validate_args("w", {"scale": 2}, key="rl.w_args") == {"scale": 2.0, "name": "a"}
    with pytest.raises(ConfigError) as e:
        reg.validate_args("w", {"scal": 2}, key="rl.w_args")
    assert e.value.key == "rl.w_args.scal" and "takes: scale, name" in e.value.message
    with pytest.raises(ConfigError) as e:
        reg.validate_args("w", {"scale": -1}, key="rl.w_args")
    assert e.value.key == "rl.w_args.scale" and "greater than 0" in e.value.message


def test_import_paths_resolve_out_of_tree_entries(tmp_path, monkeypatch):
    # a module on sys.path, and a file named by its path
    (tmp_path / "my_adv.py").write_text(
        "import torch\n"
        "def halve(x, *, factor: float = 0.5):\n"
        "    return x.rewards[:, None] * x.mask * factor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x = algos.AdvantageInputs(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.ones(2, 2))
    by_module = algos.ADVANTAGES.get("my_adv:halve")
    by_file = algos.ADVANTAGES.get(f"{tmp_path / 'my_adv.py'}:halve")
    assert by_module(x).tolist() == by_file(x).tolist() == [[0.5, 0.5], [0.0, 0.0]]
    assert algos.ADVANTAGES.validate_args("my_adv:halve", {"factor": 2}, key="k") == {"factor": 2.0}
    with pytest.raises(UserError, match="cannot import it"):
        algos.ADVANTAGES.get("no_such_module_xyz:f")
    with pytest.raises(UserError, match="has no attribute 'nope'"):
        algos.ADVANTAGES.get("my_adv:nope")


def test_importing_the_package_fills_every_registry():
    # at least the entries the presets and the docs name (a new entry needs no edit here)
    assert {"dr_grpo", "grpo", "grpo_batch_std", "reinforce_pp", "reinforce_pp_baseline", "rloo"} <= set(
        algos.ADVANTAGES.names())
    assert {"cispo", "clip_cov", "gspo", "kl_cov", "ppo_clip", "reinforce"} <= set(algos.POLICY_LOSSES.names())
    assert {"k1", "k2", "k3"} <= set(algos.KL_ESTIMATORS.names())
    assert {"constant", "prompt_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_mean"} <= set(
        algos.AGGREGATIONS.names())
    assert {"mask", "none", "seq_mask", "seq_tis", "tis"} <= set(algos.IS_CORRECTIONS.names())
    assert {"dynamic_sampling", "none", "zero_variance"} <= set(algos.GROUP_FILTERS.names())
    with pytest.raises(UserError, match="unknown policy loss 'ppo'; known: cispo, clip_cov, gspo, kl_cov, ppo_clip, reinforce"):
        algos.POLICY_LOSSES.get("ppo")
