"""Multi-turn episodes, token-in, token-out (envs/multiturn.py).

    completions, scores = run_episodes(engine, env, tokenizer, tasks, prompts, params, chat_template=True)

Every turn continues from the exact tokens of the episode so far: the first prompt, then for each turn the tokens
the engine sampled followed by the environment's answer, tokenised once when it arrives (`observation_tokens`)
and appended. Earlier turns are never re-tokenised, so a BPE tokenizer cannot merge or split what the policy
sampled ("retokenisation drift"). The environment's text is encoded as plain text: a `<|im_end|>` a tool returns
is characters, never the control token, so untrusted text cannot close the user turn and forge an assistant one.
An episode's Completion holds all of it after the first prompt: `token_ids` the policy's and the environment's
tokens in order, `policy_mask` 1 on the policy's (the only tokens that train), `logprobs` the sampler's on the
policy's tokens and 0 on the environment's. Live episodes of a turn are generated in one batch, stopping also at
the environment's `stop` strings (a tool call's closing tag); an episode ends when the environment says done, at
its `max_turns`, or when the next turn would not fit `max_episode_tokens` (the model's context, or the
environment's `max_episode_tokens` attribute if smaller: prompt, all turns and the next turn's max_new_tokens).
The `reset` and each turn's `step` calls run isolated like the environment's verifier (envs/scoring.py
`reset_many`, `step_many`: inline, thread or worker process): one that raises, runs past `step_timeout_s`,
crashes its worker or returns a malformed Turn (an observation past `max_observation_chars` included) ends that
episode only, with reward 0 and `info["error"]`; an episode whose reset failed has no tokens.
`info["turn_rewards"]` keeps each turn's reward (the credit assignment's input).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from posttrain.data.prompts import end_of_turn_id
from posttrain.envs.multiturn import episode_rules
from posttrain.envs.scoring import reset_many, step_many
from posttrain.errors import UserError
from posttrain.records import Completion, SamplingParams, Score, Task

TURN_SEED_STRIDE = 104_729  # turn t samples with seed + t * stride: episodes are reproducible turn by turn


def run_episodes(engine, env, tokenizer, tasks: Sequence[Task], prompts: Sequence[list[int]],
                 params: SamplingParams, *, chat_template: bool = True,
                 max_episode_tokens: int | None = None, step_timeout_s: float = 10.0,
                 ) -> tuple[list[Completion], list[Score]]:
    """One episode per (task, prompt) row (repeat a task to sample a group). -> (completions, scores)."""
    n = len(tasks)
    rules = episode_rules(env)  # max_turns, stop strings, budgets: checked, a UserError naming the env
    # the model's context, or the environment's own per-episode budget (prompt included) when it is smaller
    budgets = [b for b in (max_episode_tokens, rules.max_episode_tokens) if b is not None]
    max_episode_tokens = min(budgets) if budgets else None
    tokens: list[list[int]] = [[] for _ in range(n)]
    policy: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    reward, correct = [0.0] * n, [False] * n
    info: list[dict[str, Any]] = [{"turns": 0, "tool_calls": 0, "tool_errors": 0, "turn_rewards": []}
                                  for _ in range(n)]
    finish = ["length"] * n
    states = reset_many(env, tasks, timeout_s=step_timeout_s)
    live = []
    for i, state in enumerate(states):
        if isinstance(state, Score):  # the reset failed: the episode ends before its first turn
            info[i].update(state.info)
            finish[i] = "stop"
        else:
            live.append(i)
    version = getattr(engine, "version", 0)
    end = end_of_turn_id(tokenizer) if chat_template else None
    stops = tuple(params.stop) + rules.stop  # e.g. a tool call's closing tag ends the turn
    for turn in range(rules.max_turns):
        if not live:
            break
        outs = engine.generate([list(prompts[i]) + tokens[i] for i in live],
                               replace(params, seed=params.seed + turn * TURN_SEED_STRIDE, stop=stops))
        for i, out in zip(live, outs, strict=True):
            version = out.policy_version
            tokens[i] += out.token_ids
            policy[i] += [1] * len(out.token_ids)
            logprobs[i] += out.logprobs
            info[i]["turns"] += 1
        # The turn's own tokens decoded: an engine's `text` stops before a stop string, and a tool call's closing
        # tag is the environment's to read.
        actions = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
        results = step_many(env, [tasks[i] for i in live], [states[i] for i in live], actions,
                            timeout_s=step_timeout_s, max_observation_chars=rules.max_observation_chars)
        still = []
        for i, out, result in zip(live, outs, results, strict=True):
            if isinstance(result, Score):  # the step failed: this episode ends with nothing
                reward[i], correct[i] = 0.0, False
                info[i].update(result.info, turn_rewards=[0.0] * info[i]["turns"])
                finish[i] = "stop"
                continue
            reward[i] += float(result.reward)
            info[i]["turn_rewards"].append(float(result.reward))
            correct[i] = bool(result.correct)
            states[i] = result.state
            for key in ("tool_calls", "tool_errors"):
                info[i][key] += int(result.info.get(key, 0))
            if result.done or result.observation is None:
                finish[i] = "stop"
                continue
            closed = bool(out.token_ids) and out.token_ids[-1] == end
            obs = observation_tokens(tokenizer, result.observation, chat_template=chat_template, closed=closed)
            if max_episode_tokens is not None and (len(prompts[i]) + len(tokens[i]) + len(obs)
                                                   + params.max_new_tokens > max_episode_tokens):
                continue  # the next turn would not fit: the episode ends truncated
            tokens[i] += obs
            policy[i] += [0] * len(obs)
            logprobs[i] += [0.0] * len(obs)
            still.append(i)
        live = still
    completions = [Completion(tuple(prompts[i]), tuple(tokens[i]), tuple(logprobs[i]), finish[i],  # type: ignore[arg-type]
                              tokenizer.decode(tokens[i]), version, tuple(policy[i])) for i in range(n)]
    return completions, [Score(reward[i], correct[i], info[i]) for i in range(n)]


_PROBE, _SLOT = "\u2063posttrain-probe\u2063", "\u2063posttrain-observation\u2063"  # text no template rewrites


def observation_tokens(tokenizer, text: str, *, chat_template: bool, closed: bool) -> list[int]:
    """An environment's reply as the tokens that follow the policy's turn: in chat format the rest of the
    template's end of the assistant turn (without its end-of-turn token when the policy's own stop token already
    `closed` the turn), the user turn holding `text` and the opened assistant turn; in raw text, the text itself.
    The template's own control tokens are real; `text` is encoded with special tokens split
    (`split_special_tokens`), so whatever it holds is ordinary text tokens."""
    plain = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    if not chat_template:
        return plain
    before, after = _user_turn_frame(tokenizer)
    ids = [*tokenizer(before, add_special_tokens=False).input_ids, *plain,
           *tokenizer(after, add_special_tokens=False).input_ids]
    end = end_of_turn_id(tokenizer)
    return ids[1:] if closed and end is not None and ids[:1] == [end] else ids


@functools.lru_cache(maxsize=16)
def _user_turn_frame(tokenizer) -> tuple[str, str]:
    """The template's text after an assistant turn around the next user turn's content (up to the opened
    assistant turn), found by rendering a probe assistant turn and a slot for the content."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE},
                                          {"role": "user", "content": _SLOT}], add_generation_prompt=True,
                                         tokenize=False)
    if _PROBE not in text or _SLOT not in text.split(_PROBE, 1)[1]:
        raise UserError("the chat template drops assistant turns, so a multi-turn episode cannot be rendered; "
                        "set model.chat_template = false")
    before, _, after = text.split(_PROBE, 1)[1].partition(_SLOT)
    return before, after


def episode_summary(completions: Sequence[Completion], scores: Sequence[Score]) -> dict[str, float]:
    """Turns, turns to solve (over solved episodes; absent when none was), tool calls and errors, failed steps,
    the episode's tokens by whose they are, and the reward per turn; {} for single-turn samples (no "turns" in
    their info)."""
    if not scores or "turns" not in scores[0].info:
        return {}
    n = len(scores)
    turns = sum(s.info["turns"] for s in scores)
    solved = [s.info["turns"] for s in scores if s.correct]
    policy = sum(sum(c.policy_mask) if c.policy_mask is not None else len(c.token_ids) for c in completions)
    return {"turns_mean": turns / n,
            **({"turns_to_solve": sum(solved) / len(solved)} if solved else {}),
            "tool_calls_mean": sum(s.info.get("tool_calls", 0) for s in scores) / n,
            "tool_errors_mean": sum(s.info.get("tool_errors", 0) for s in scores) / n,
            "env_errors": float(sum(1 for s in scores if "error" in s.info)),
            "policy_tokens_mean": policy / n,
            "env_tokens_mean": sum(len(c.token_ids) for c in completions) / n - policy / n,
            "reward_per_turn": sum(s.reward for s in scores) / max(1, turns)}
