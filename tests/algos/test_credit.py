"""Credit assignment over multi-turn episodes (algos/credit.py), against hand-computed values."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from posttrain.algos import ADVANTAGES, AdvantageInputs
from posttrain.algos.credit import CREDIT, CreditInputs, returns_to_go, turn_index
from posttrain.config import validate
from posttrain.errors import UserError

GRPO = functools.partial(ADVANTAGES.get("grpo"), eps=0.0)
DR_GRPO = ADVANTAGES.get("dr_grpo")


def test_returns_to_go_by_hand():
    assert returns_to_go([0.0, 0.0, 1.0], 0.5) == [0.25, 0.5, 1.0]
    assert returns_to_go([1.0, 2.0], 1.0) == [3.0, 2.0]
    assert returns_to_go([], 0.9) == []


def test_turn_index_numbers_runs_of_policy_tokens():
    idx = turn_index([(1, 1, 0, 0, 1, 0, 1), None], [7, 3], 8)
    assert idx.tolist() == [[0, 0, -1, -1, 1, -1, 2, -1], [0, 0, 0, -1, -1, -1, -1, -1]]


def two_episodes() -> CreditInputs:
    """One group: episode A has two turns (rewards 0 then 1) with an environment token between them; episode B
    one turn with reward 0.5."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    policy = [(1, 1, 0, 1), (1, 1)]
    base = AdvantageInputs(torch.tensor([1.0, 0.5]), torch.tensor([0, 0]), mask)
    return CreditInputs(base, [[0.0, 1.0], [0.5]], turn_index(policy, [4, 2], 4))


def test_per_turn_by_hand():
    x = two_episodes()
    # turn 0: returns A = 1, B = 0.5 -> GRPO (r - 0.75) / std([1, 0.5]) = +-0.25 / 0.35355 = +-0.70711;
    # turn 1: A alone in its group -> 0. The environment token and the padding get 0.
    got = CREDIT.get("per_turn")(x, GRPO, gamma=1.0)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(got, torch.tensor([[s, s, 0.0, 0.0], [-s, -s, 0.0, 0.0]]))
    # gamma = 0.5: A's turn-0 return is 0.5, equal to B's -> both 0 at turn 0 (dr_grpo: r - mean).
    got = CREDIT.get("per_turn")(x, DR_GRPO, gamma=0.5)
    torch.testing.assert_close(got, torch.zeros(2, 4))
    got = CREDIT.get("per_turn")(x, DR_GRPO, gamma=0.0)  # A's turn 0 earns nothing: 0 - 0.25
    torch.testing.assert_close(got, torch.tensor([[-0.25, -0.25, 0.0, 0.0], [0.25, 0.25, 0.0, 0.0]]))


def test_episode_credit_is_the_estimator_on_every_policy_token():
    x = two_episodes()
    got = CREDIT.get("episode")(x, DR_GRPO)  # episode rewards 1 and 0.5 -> +-0.25 on each one's policy tokens
    torch.testing.assert_close(got, torch.tensor([[0.25, 0.25, 0.0, 0.25], [-0.25, -0.25, 0.0, 0.0]]))


def test_single_turn_samples_get_the_estimator_alone_under_every_entry():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=g)
    mask = (torch.rand(12, 5, generator=g) > 0.3).float()
    base = AdvantageInputs(rewards, torch.arange(3).repeat_interleave(4), mask)
    x = CreditInputs(base, [[r] for r in rewards.tolist()], turn_index([None] * 12, [5] * 12, 5))
    for name in CREDIT.names():
        torch.testing.assert_close(CREDIT.get(name)(x, GRPO), GRPO(base))


def test_reward_not_in_the_turns_counts_at_the_last_turn():
    """A shaped or controlled episode reward (here 0.8 against turns summing to 1.0) keeps its total."""
    mask = torch.ones(1, 2)
    x = CreditInputs(AdvantageInputs(torch.tensor([0.8]), torch.tensor([0]), mask), [[0.5, 0.5]],
                     turn_index([(1, 1)], [2], 2))
    assert x.settled_turn_rewards() == [[0.5, pytest.approx(0.3)]]


def test_shapes_are_checked():
    x = two_episodes()
    with pytest.raises(ValueError, match="turn-reward lists"):
        CreditInputs(x.base, [[1.0]], x.turn_index)
    with pytest.raises(ValueError, match="turn_index"):
        CreditInputs(x.base, x.turn_rewards, x.turn_index[:, :2])


def test_recipe_keys_are_validated():
    def rl(**keys):
        return validate({"recipe": "rl", "name": "t", "model": {"path": "tiny-3m"}, "rl": keys}).rl

    assert rl(credit="per_turn", credit_args={"gamma": 0.9}).credit_args == {"gamma": 0.9}
    assert rl(credit="per_turn").credit_args == {"gamma": 1.0}  # the resolved config shows the default
    with pytest.raises(UserError, match="rl.credit"):
        rl(credit="per_step")
    with pytest.raises(UserError, match="gamma"):
        rl(credit="per_turn", credit_args={"gamma": 2.0})
