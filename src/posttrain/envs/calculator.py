"""Arithmetic with a calculator tool: a multi-turn task. Large operands are hard for a small model to add in its
head; it may instead write `<calc>1234*5678</calc>`, and the environment answers `<result>7006652</result>` (or
`<error>...</error>`) as the next user turn. Any other reply is the final answer, scored like `arithmetic`.

The calculator is countdown's exact integer parser (envs/countdown.py: + - * / and parentheses, exact division,
at most 64 tokens; no eval, so a call can neither hang nor run code). `<calc>` calls are counted in
info["tool_calls"], failed ones in info["tool_errors"]. Generation also stops at "</calc>" (the `stop` strings).
Each call's turn is rewarded -call_cost (the final answer's turn 1 or 0), so a call is worth making only where
answering directly would fail.

SFT data (`demonstration`): with probability `demo_tool_rate` an episode that calls the calculator on the
question's expression and then answers with the result, otherwise the answer directly; the same rate at every
operand size, so which questions deserve a call is left to RL.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from posttrain.envs.arithmetic import Arithmetic
from posttrain.envs.countdown import ExprError, evaluate
from posttrain.envs.multiturn import Turn
from posttrain.envs.prompting import instruct
from posttrain.records import Message, Task

OPEN, CLOSE = "<calc>", "</calc>"
HINT = "You may use a calculator: write <calc>expression</calc> and you will get the result."


def tool_call(action: str) -> str | None:
    """The expression of the action's first call: what lies between its first `<calc>` and the first `</calc>`
    after it, or None without one (what the regex `<calc>(.*?)</calc>` finds). Two scans, linear in the action's
    length: the regex retried its lazy scan from every unclosed `<calc>`, quadratic (30 s on 40,000 of them)."""
    start = action.find(OPEN)
    end = action.find(CLOSE, start + len(OPEN)) if start >= 0 else -1
    return action[start + len(OPEN):end] if end >= 0 else None


class Calculator:
    """Multi-turn tool use: arithmetic with a <calc>...</calc> tool (digits, ops, max_turns)."""

    name = "calculator"
    isolation = "inline"
    stop = (CLOSE,)

    def __init__(self, digits: int | list[int] = 4, ops: str = "+", max_turns: int = 3, hint: bool = True,
                 call_cost: float = 0.0, demo_tool_rate: float = 0.5):
        self.inner = Arithmetic(digits=digits, ops=ops)
        self.hint = HINT if hint else None
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if not 0 <= demo_tool_rate <= 1:
            raise ValueError(f"demo_tool_rate must be in [0, 1], got {demo_tool_rate}")
        self.max_turns, self.call_cost, self.demo_tool_rate = max_turns, call_cost, demo_tool_rate

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        return self.inner.tasks(split, seed)

    def prompt(self, task: Task) -> list[Message]:
        return instruct(self.inner.prompt(task), self.hint, system_prompt=None)

    def reset(self, task: Task) -> dict[str, Any]:
        return {"turn": 0}

    def step(self, task: Task, state: dict[str, Any], action: str) -> Turn:
        turn = state["turn"] + 1
        call = tool_call(action)
        if call is None:  # the final answer
            score = self.inner.score(task, action)
            return Turn(None, score.reward, True, score.correct, {"turn": turn})
        try:
            value, _ = evaluate(call)
            observation, errors = f"<result>{value}</result>", 0
        except ExprError as e:
            observation, errors = f"<error>{e}</error>", 1
        done = turn >= self.max_turns  # a call on the last turn leaves no turn for the answer
        return Turn(None if done else observation, -self.call_cost, done, False, {"turn": turn},
                    {"tool_calls": 1, "tool_errors": errors})

    def demonstration(self, task: Task, rng: random.Random) -> list[Message]:
        """An episode for SFT: a call on the question's expression then its result, or the answer directly."""
        messages: list[Message] = [*self.prompt(task)]
        if self.max_turns >= 2 and rng.random() < self.demo_tool_rate:
            call = f"<calc>{task.question.rstrip('=')}</calc>"
            result = self.step(task, self.reset(task), call)
            messages += [{"role": "assistant", "content": call}, {"role": "user", "content": result.observation or ""}]
        return [*messages, {"role": "assistant", "content": task.solution}]
