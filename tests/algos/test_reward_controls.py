"""Reward controls (algos/reward_controls.py): each one's statistics, and that correctness is left alone."""

from dataclasses import replace

import pytest
import torch

from posttrain.algos.reward_controls import REWARD_CONTROLS, RewardControlInputs
from posttrain.config import validate
from posttrain.envs import make_env
from posttrain.envs.base import answer_parses
from posttrain.envs.scoring import Scorer
from posttrain.errors import UserError

N = 20_000


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    correct = torch.rand(N, generator=g) < 0.3
    formatted = correct | (torch.rand(N, generator=g) < 0.5)
    return RewardControlInputs(correct.float(), correct, formatted)


def control(name, x, seed=1, **hp):
    return REWARD_CONTROLS.get(name)(x, torch.Generator().manual_seed(seed), **hp)


def test_random_is_bernoulli_at_its_rate_and_uncorrelated_with_correctness():
    x = inputs()
    r = control("random", x, rate=0.2)
    assert set(r.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(r.mean()) - 0.2) < 4 * (0.2 * 0.8 / N) ** 0.5
    corr = torch.corrcoef(torch.stack([r, x.correct.float()]))[0, 1]
    assert abs(float(corr)) < 4 / N**0.5
    assert torch.equal(r, control("random", x, rate=0.2))  # seeded: a resumed run draws the same rewards
    assert not torch.equal(r, control("random", x, seed=2, rate=0.2))


def test_incorrect_format_constant_and_verifier():
    x = inputs()
    assert torch.equal(control("incorrect", x), (~x.correct).float())
    assert torch.equal(control("format", x), x.formatted.float())
    assert torch.equal(control("constant", x, value=0.5), torch.full((N,), 0.5))
    assert torch.equal(control("verifier", x), x.rewards)


def test_noisy_flips_at_its_rate_and_adds_gaussian_noise():
    x = inputs()
    r = control("noisy", x, flip=0.25)
    flipped = (r != x.rewards).float().mean()
    assert abs(float(flipped) - 0.25) < 4 * (0.25 * 0.75 / N) ** 0.5
    r = control("noisy", x, flip=0.0, std=0.5)
    assert abs(float((r - x.rewards).std()) - 0.5) < 0.02 and abs(float((r - x.rewards).mean())) < 0.02


def test_answer_parses_wants_a_number_where_the_answer_is_one():
    env = make_env("arithmetic", {"digits": 2})
    task = next(env.tasks("train", 0))
    assert answer_parses(env, task, "12") and answer_parses(env, task, "The answer is 5.")
    assert not answer_parses(env, task, "abc") and not answer_parses(env, task, "")
    assert answer_parses(env, task, task.question + "46")  # the echoed question the verifier accepts
    assert not answer_parses(env, task, task.question + "4a")
    generic = object()  # an environment without its own test: a number where the reference answer is one
    assert answer_parses(generic, task, "The answer is 12.") and not answer_parses(generic, task, "twelve")
    assert answer_parses(generic, replace(task, answer="abc"), "twelve")


def test_the_scorer_replaces_rewards_but_keeps_the_verdicts():
    env = make_env("arithmetic", {"digits": 2})
    tasks = [t for t, _ in zip(env.tasks("train", 0), range(50))]
    texts = [t.answer if i % 2 else "x" for i, t in enumerate(tasks)]
    plain = Scorer(env)(tasks, texts)
    wrong = Scorer(env, control="incorrect")(tasks, texts, seed=3)
    assert [s.correct for s in wrong] == [s.correct for s in plain] == [bool(i % 2) for i in range(50)]
    assert [s.reward for s in wrong] == [1.0 - s.reward for s in plain]
    assert [s.info["verifier_reward"] for s in wrong] == [s.reward for s in plain]
    assert Scorer(env, control="incorrect").verifier_only()(tasks, texts) == plain


def test_the_recipe_key_is_validated_and_its_args_filled_in():
    base = {"recipe": "rl", "name": "t", "env": {"name": "arithmetic", "reward": "random"}}
    assert validate(base, "t").env.reward_args == {"rate": 0.5}
    with pytest.raises(UserError, match="env.reward"):
        validate({**base, "env": {"reward": "randon"}}, "t")
    with pytest.raises(UserError, match="env.reward_args.rate"):
        validate({**base, "env": {"reward": "random", "reward_args": {"rate": 2}}}, "t")
