"""Multi-turn episodes token-in, token-out (rollout/episodes.py): the learner trains on exactly the sampled tokens
plus the environment's, learner and sampler logprobs agree on the policy's tokens, environment tokens get no
gradient, a failing environment costs its episode only, and an RL run on guess_number logs and resumes exactly."""

import itertools
import math
import os
import random
import time

import pytest
import torch
from resume_helpers import crash_after, metric_rows_without_time
from transformers import AutoModelForCausalLM

from posttrain.algos import AGGREGATIONS, POLICY_LOSSES, PolicyLossInputs, normalisers_for
from posttrain.config import validate
from posttrain.data.prompts import end_of_turn_id, observation_ids, render_prompt
from posttrain.data.sft import env_examples
from posttrain.envs import make_env
from posttrain.envs.scoring import shutdown_pool
from posttrain.errors import UserError
from posttrain.models import load_model, load_tokenizer, resolve_model_path
from posttrain.recipes.rl import train_mask
from posttrain.records import Completion, SamplingParams
from posttrain.report import write_report
from posttrain.rollout.episodes import run_episodes
from posttrain.rollout.local import LocalEngine
from posttrain.runner import run
from posttrain.train.learner import Learner, Sequences


@pytest.fixture(scope="module")
def bpe():
    path = resolve_model_path("tiny-3m-bpe", seed=0)
    return load_model(path), load_tokenizer(path)


class ScriptedEngine:
    """Replies with fixed token ids, turn after turn, and records every prompt it was given."""

    def __init__(self, tokenizer, replies: list[list[int]]):
        self.tokenizer, self.replies, self.prompts, self.version = tokenizer, replies, [], 0

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            ids = self.replies[len(self.prompts)]
            self.prompts.append(list(p))
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for stop in params.stop:  # like the real engines: the text ends before a stop string
                text = text.split(stop)[0]
            out.append(Completion(tuple(p), tuple(ids), tuple(-0.5 for _ in ids), "stop", text))
        return out


def chars(tok, text):  # the text as one token per character: not what the BPE tokenizer would make of it
    return [i for c in text for i in tok(c, add_special_tokens=False).input_ids]


def test_a_three_turn_episode_trains_on_exactly_the_sampled_and_environment_tokens(bpe):
    _, tok = bpe
    env = make_env("guess_number", {"hi": 16, "max_turns": 3})
    task = next(t for t in env.tasks("train", 0) if t.answer not in ("3", "5", "7"))
    end = end_of_turn_id(tok)
    replies = [chars(tok, "I guess 3") + [end], chars(tok, "guess 5") + [end], chars(tok, "7")]  # the last: cut
    engine = ScriptedEngine(tok, replies)
    prompt = render_prompt(tok, env.prompt(task))
    (episode,), (score,) = run_episodes(engine, env, tok, [task], [prompt], SamplingParams(max_new_tokens=12))
    obs = [observation_ids(tok, "higher" if int(g) < int(task.answer) else "lower", chat_template=True, closed=True)
           for g in ("3", "5")]
    expected = replies[0] + obs[0] + replies[1] + obs[1] + replies[2]
    assert list(episode.token_ids) == expected
    assert list(episode.policy_mask) == [1] * len(replies[0]) + [0] * len(obs[0]) + [1] * len(replies[1]) + [
        0] * len(obs[1]) + [1] * len(replies[2])
    assert all(lp == 0.0 for lp, m in zip(episode.logprobs, episode.policy_mask, strict=True) if m == 0)
    # each turn continued from the exact tokens so far: no turn was re-tokenised
    assert engine.prompts == [prompt, prompt + replies[0] + obs[0], prompt + replies[0] + obs[0] + replies[1] + obs[1]]
    # and re-tokenising the episode's text would have changed the tokens
    assert tok(tok.decode(expected), add_special_tokens=False).input_ids != expected
    assert score.info["turns"] == 3 and not score.correct and score.reward == 0.0
    # the policy's own <|im_end|> closed its turn; the environment's tokens are the rest of the template's turn
    assert obs[0][0] != end and tok.decode(obs[0]).startswith("\n<|im_start|>user\n")
    assert tok.decode(obs[0]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_learner_logprobs_equal_the_samplers_on_policy_tokens_and_env_tokens_get_no_gradient(bpe):
    model, tok = bpe
    model = model.float()
    env = make_env("guess_number", {"hi": 16, "max_turns": 3})
    tasks = [t for _, t in zip(range(4), env.tasks("train", 1))]
    prompts = [render_prompt(tok, env.prompt(t)) for t in tasks]
    engine = LocalEngine(model, tok)
    episodes, scores = run_episodes(engine, env, tok, tasks, prompts, SamplingParams(max_new_tokens=5, seed=3))
    assert any(s.info["turns"] > 1 for s in scores) and any(0 in e.policy_mask for e in episodes)
    learner = Learner(model, lr=1e-3, total_updates=1, micro_batch_size=8, pad_id=tok.pad_token_id)
    seqs = Sequences(prompts, [list(e.token_ids) for e in episodes])
    lp, _ = learner.logprobs(seqs)
    for e, row in zip(episodes, lp, strict=True):
        policy = torch.tensor(e.policy_mask).bool()
        assert torch.allclose(row[policy], torch.tensor(e.logprobs)[policy], atol=1e-5)
    # the RL step's mask and loss: the gradient reaches the policy tokens and no environment token
    mask = train_mask(episodes)
    width = mask.shape[1]
    logprobs = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in lp]).requires_grad_(True)
    per_token, _ = POLICY_LOSSES.get("ppo_clip")(PolicyLossInputs(logprobs, logprobs.detach(),
                                                                  torch.ones_like(mask), mask))
    norm, group_tokens = normalisers_for(mask, torch.zeros(len(episodes), dtype=torch.long), width)
    AGGREGATIONS.get("token_mean")(per_token, mask, norm=norm, group_tokens=group_tokens).backward()
    grad = logprobs.grad
    env_tokens = (mask == 0) & (torch.arange(width)[None] < torch.tensor([len(e.token_ids) for e in episodes])[:, None])
    assert env_tokens.any() and (grad[env_tokens] == 0).all() and (grad[mask.bool()] != 0).all()


class Flaky:
    """guess_number whose step raises for one secret (an environment that crashes)."""

    name, max_turns = "flaky", 3

    def __init__(self):
        self.inner = make_env("guess_number", {"hi": 4, "max_turns": 3})

    def prompt(self, task):
        return self.inner.prompt(task)

    def reset(self, task):
        return self.inner.reset(task)

    def step(self, task, state, action):
        if task.answer == "2":
            raise RuntimeError("tool crashed")
        return self.inner.step(task, state, action)


def test_a_crashing_environment_costs_its_episode_only(bpe):
    _, tok = bpe
    env = Flaky()
    tasks = [next(t for t in env.inner.tasks("train", 0) if t.answer == a) for a in ("2", "3")]
    engine = ScriptedEngine(tok, [chars(tok, "1")] * 10)
    prompts = [render_prompt(tok, env.prompt(t)) for t in tasks]
    _, scores = run_episodes(engine, env, tok, tasks, prompts, SamplingParams(max_new_tokens=4))
    assert scores[0].info["error"] == "exception" and "tool crashed" in scores[0].info["detail"]
    assert scores[0].info["turns"] == 1 and scores[1].info["turns"] == 3 and "error" not in scores[1].info


HANG_S = 3600  # far past any wall time a loaded CI machine takes: returning at all proves the cut


class HangsInAThread(Flaky):
    """Its tool hangs (or kills its process) for one secret; the steps run in threads."""

    isolation = "thread"

    def step(self, task, state, action):
        if task.answer == "2":
            if os.environ.get("POSTTRAIN_TEST_EXIT") == "1":
                os._exit(3)
            time.sleep(HANG_S)
        return self.inner.step(task, state, action)


class HangsInAProcess(HangsInAThread):
    isolation = "process"


@pytest.mark.parametrize("env_cls,how", [(HangsInAThread, "hang"), (HangsInAProcess, "hang"),
                                         (HangsInAProcess, "exit")])
def test_a_hanging_or_dying_tool_costs_its_episode_only(bpe, monkeypatch, env_cls, how):
    _, tok = bpe
    monkeypatch.setenv("POSTTRAIN_TEST_EXIT", "1" if how == "exit" else "0")
    shutdown_pool()  # worker processes inherit the variable when they start: start fresh ones
    env = env_cls()
    tasks = [next(t for t in env.inner.tasks("train", 0) if t.answer == a) for a in ("2", "3")]
    engine = ScriptedEngine(tok, [chars(tok, "1")] * 10)
    prompts = [render_prompt(tok, env.prompt(t)) for t in tasks]
    start = time.monotonic()
    _, scores = run_episodes(engine, env, tok, tasks, prompts, SamplingParams(max_new_tokens=4), step_timeout_s=1.0)
    # the hanging step was cut at its 1 s timeout, not waited for; the bound only leaves room for worker
    # start-up on a machine busy with other tests (CI once took 20 s here)
    assert time.monotonic() - start < HANG_S / 30
    assert scores[0].info["error"] == ("timeout" if how == "hang" else "crash")
    assert scores[0].reward == 0.0 and scores[0].info["turn_rewards"] == [0.0]
    assert scores[1].info["turns"] == 3 and "error" not in scores[1].info


def test_rl_on_guess_number_logs_episodes_evaluates_and_resumes_exactly(tmp_path):
    cfg = validate({
        "recipe": "rl", "name": "guess", "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": "tiny-test"}, "env": {"name": "guess_number", "args": {"hi": 8, "max_turns": 3}},
        "rl": {"steps": 4, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 3, "lr": 1e-3,
               "micro_batch_size": 8},
        "eval": {"problems": 4, "samples": 2, "ks": [1, 2], "max_new_tokens": 3, "at_start": False},
        "checkpoint": {"every": 2, "keep_last_n": 5},
    }, "test")
    run(cfg)
    rows = [r for r in metric_rows_without_time(cfg.run_dir) if "episode/turns_mean" in r]
    assert len(rows) == 4 and all(1 <= r["episode/turns_mean"] <= 3 and r["episode/env_tokens_mean"] > 0
                                  for r in rows)
    assert rows[-1]["compute/generate_flops"] > 0 and rows[-1]["compute/train_flops"] > 0
    page = write_report([cfg.run_dir]).read_text()  # the episode panels: turns drawn, tool calls (none) noted
    assert "Tool calls per episode is not drawn: it is zero at every step." in page
    assert "Tool errors per episode is not drawn: it is zero at every step." in page
    reference = metric_rows_without_time(cfg.run_dir)
    final = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").state_dict()
    crash_after(cfg.run_dir, 2)
    run(cfg)
    assert metric_rows_without_time(cfg.run_dir) == reference
    resumed = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").state_dict()
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_the_ledger_counts_a_prefill_and_the_decode_of_every_turn(tiny):
    from posttrain.rollout.collect import RolloutBatch, generation_flops, policy_turns
    from posttrain.tracking.ledger import FlopModel

    flops = FlopModel.from_model(tiny[0])
    episode = Completion((1, 2, 3), (5, 6, 7, 8, 9, 10), (0.0,) * 6, "stop", "", 0, (1, 1, 0, 0, 1, 1))
    assert policy_turns(episode) == [(0, 2), (4, 2)]
    batch = RolloutBatch([None], [[1, 2, 3]], [episode], [None], torch.tensor([0]))
    assert generation_flops(flops, batch) == pytest.approx(
        flops.prefill(3) + flops.decode_steps(3, 2) + flops.prefill(7) + flops.decode_steps(7, 2))


def test_the_calculator_tool_answers_calls_counts_errors_and_scores_the_final_answer(bpe):
    env = make_env("calculator", {"digits": 4, "max_turns": 3})
    task = next(env.tasks("train", 0))
    a, b = task.question[:-1].split("+")
    state = env.reset(task)
    call = env.step(task, state, f"<calc>{a}+{b}</calc>")
    assert call.observation == f"<result>{int(a) + int(b)}</result>" and not call.done
    assert call.info == {"tool_calls": 1, "tool_errors": 0}
    bad = env.step(task, call.state, "<calc>12+</calc>")
    assert bad.observation.startswith("<error>") and bad.info["tool_errors"] == 1
    final = env.step(task, bad.state, task.answer)
    assert final.done and final.correct and final.reward == 1.0
    # an episode through run_episodes: a call, its result, then the answer; the tool calls reach the score
    _, tok = bpe
    end = end_of_turn_id(tok)
    engine = ScriptedEngine(tok, [chars(tok, f"<calc>{a}+{b}</calc>"), chars(tok, task.answer) + [end]])
    (episode,), (score,) = run_episodes(engine, env, tok, [task], [render_prompt(tok, env.prompt(task))],
                                        SamplingParams(max_new_tokens=24))
    assert score.correct and score.info["tool_calls"] == 1 and score.info["tool_errors"] == 0
    assert f"<result>{int(a) + int(b)}</result>" in tok.decode(episode.token_ids)
    # the call did not end with the end-of-turn token, so the environment closed the assistant turn first
    first_env = episode.policy_mask.index(0)
    assert episode.token_ids[first_env] == end


def test_a_call_costs_its_turn_and_the_episode_keeps_each_turns_reward(bpe):
    _, tok = bpe
    env = make_env("calculator", {"digits": 4, "max_turns": 3, "call_cost": 0.2})
    task = next(env.tasks("train", 0))
    end = end_of_turn_id(tok)
    engine = ScriptedEngine(tok, [chars(tok, f"<calc>{task.question[:-1]}</calc>"), chars(tok, task.answer) + [end]])
    _, (score,) = run_episodes(engine, env, tok, [task], [render_prompt(tok, env.prompt(task))],
                               SamplingParams(max_new_tokens=24))
    assert score.info["turn_rewards"] == [-0.2, 1.0] and score.reward == pytest.approx(0.8) and score.correct


def test_sft_on_demonstrated_episodes_gives_one_example_per_assistant_turn(bpe):
    _, tok = bpe
    env = make_env("guess_number", {"hi": 16, "max_turns": 6, "demo_skill": 1.0})
    rng = random.Random(0)
    for task in itertools.islice(env.tasks("train", 0), 50):  # demo_skill 1: every guess is one the feedback allows
        messages = env.demonstration(task, rng)
        lo, hi = 1, 16
        for m, nxt in zip(messages[1::2], [*messages[2::2], None]):
            guess = int(m["content"])
            assert lo <= guess <= hi
            if nxt is None:
                assert guess == int(task.answer) or len(messages) == 12
            else:
                lo, hi = (guess + 1, hi) if nxt["content"] == "higher" else (lo, guess - 1)
    calc = make_env("calculator", {"digits": 4, "max_turns": 2, "hint": False, "demo_tool_rate": 1.0})
    examples = list(itertools.islice(env_examples(calc, tok, seed=0, chat_template=True, max_len=None), 4))
    task = next(calc.tasks("train", 0))
    first, second = (tok.decode(e.prompt + e.completion) for e in examples[:2])
    assert first.endswith(f"<calc>{task.question[:-1]}</calc>" + tok.decode([end_of_turn_id(tok)]))
    end = tok.decode([end_of_turn_id(tok)])
    assert f"<result>{int(task.answer)}</result>" in second and second.endswith(task.answer + end)
    assert tok.decode(examples[1].prompt).startswith(tok.decode(examples[0].prompt))  # the call is in its prompt


def test_a_reward_control_applies_to_episodes_too(tmp_path):
    cfg = validate({
        "recipe": "rl", "name": "guess-random", "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": "tiny-test"}, "env": {"name": "guess_number", "args": {"hi": 8, "max_turns": 2},
                                                 "reward": "random"},
        "rl": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 3, "lr": 1e-3},
        "eval": {"problems": 4, "samples": 2, "ks": [1, 2], "max_new_tokens": 3, "at_start": False},
    }, "test")
    run(cfg)
    rows = [r for r in metric_rows_without_time(cfg.run_dir) if "episode/turns_mean" in r]
    assert all("rollout/verifier_reward_mean" in r for r in rows)
    assert sum(r["rollout/reward_mean"] for r in rows) > sum(r["rollout/verifier_reward_mean"] for r in rows)


def test_retry_with_feedback_makes_any_single_turn_env_multi_turn():
    env = make_env("retry_with_feedback", {"env": "arithmetic", "args": {"digits": 3}, "max_turns": 3})
    task = next(env.tasks("train", 0))
    wrong = env.step(task, env.reset(task), "1")
    assert (wrong.observation, wrong.reward, wrong.done) == ("Wrong, try again.", 0.0, False)
    right = env.step(task, wrong.state, task.answer)
    assert right.done and right.correct and right.reward == 0.5  # decay 0.5 on the second try
    last = env.step(task, {"tries": 2}, "1")
    assert last.done and last.observation is None and not last.correct
    assert env.isolation == "inline"  # the inner verifier's trust level
    with pytest.raises(UserError, match="already multi-turn"):
        make_env("retry_with_feedback", {"env": "guess_number"})


def test_rl_with_per_turn_credit_trains_on_episodes(tmp_path):
    cfg = validate({
        "recipe": "rl", "name": "per-turn", "output_dir": str(tmp_path), "seed": 0, "threads": 1,
        "model": {"path": "tiny-test"},
        "env": {"name": "calculator", "args": {"digits": 1, "max_turns": 2, "hint": False, "call_cost": 0.2}},
        "rl": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "lr": 1e-3,
               "micro_batch_size": 8, "credit": "per_turn", "credit_args": {"gamma": 0.9},
               "group_filter": "none"},
        "eval": {"problems": 2, "samples": 2, "ks": [1, 2], "max_new_tokens": 4, "at_start": False},
    }, "test")
    run(cfg)
    rows = [r for r in metric_rows_without_time(cfg.run_dir) if "pg/loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["pg/loss"]) and math.isfinite(r["rollout/adv_abs_mean"])
                                  for r in rows)
    assert "credit = \"per_turn\"" in (cfg.run_dir / "config.toml").read_text()


def test_an_environment_token_budget_ends_its_episodes(bpe):
    _, tok = bpe
    env = Flaky()
    task = next(t for t in env.inner.tasks("train", 0) if t.answer == "3")
    prompt = render_prompt(tok, env.prompt(task))
    engine = ScriptedEngine(tok, [chars(tok, "1")] * 10)
    _, (free,) = run_episodes(engine, env, tok, [task], [prompt], SamplingParams(max_new_tokens=4))
    feedback = observation_ids(tok, "higher", chat_template=True, closed=False)
    env.max_episode_tokens = len(prompt) + 1 + len(feedback) + 4 - 1  # one token short of a second turn
    _, (capped,) = run_episodes(engine, env, tok, [task], [prompt], SamplingParams(max_new_tokens=4))
    assert free.info["turns"] == 3 and capped.info["turns"] == 1
