import pytest

from posttrain import algos
from posttrain.algos.registry import Registry
from posttrain.errors import UserError


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
    assert str(e.value) == "unknown widget 'gamma'; known: alpha, beta"


def test_duplicate_registration_is_a_bug():
    reg: Registry = Registry("widget")
    reg.register("x")(lambda: 0)
    with pytest.raises(ValueError, match="'x' is already registered"):
        reg.register("x")(lambda: 1)


def test_importing_the_package_fills_every_registry():
    assert algos.ADVANTAGES.names() == ["dr_grpo", "grpo", "grpo_batch_std", "reinforce_pp", "rloo"]
    assert algos.POLICY_LOSSES.names() == ["cispo", "gspo", "ppo_clip", "reinforce"]
    assert algos.KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    assert algos.AGGREGATIONS.names() == [
        "constant", "prompt_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_mean",
    ]
    assert algos.IS_CORRECTIONS.names() == ["mask", "none", "seq_mask", "seq_tis", "tis"]
    with pytest.raises(UserError, match="unknown policy loss 'ppo'; known: cispo, gspo, ppo_clip, reinforce"):
        algos.POLICY_LOSSES.get("ppo")
