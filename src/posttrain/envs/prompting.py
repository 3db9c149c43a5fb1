"""The instruction form of any environment: `hint` (a format instruction appended to the user's message) and
`system_prompt` (a system message before it), accepted in env.args by every environment, built-in or the user's.

Instruct models answer a bare '19+95=' with unrelated text; 'Give only the number.' and a system prompt of the
user's choosing (an empty one replaces a template's default, e.g. SmolLM2's 30-token 'You are a helpful AI
assistant named SmolLM...') are what they need. make_env applies them here unless the environment's constructor
takes `hint` itself; the wrapper forwards every other attribute to the environment, so its verifier, isolation and
episode methods are its own.
"""

from __future__ import annotations

from typing import Any

from posttrain.records import Message, Task

PROMPT_ARGS = ("hint", "system_prompt")


def as_messages(prompt: list[Message] | str) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def instruct(prompt: list[Message] | str, hint: str | None, system_prompt: str | None) -> list[Message] | str:
    """The prompt with the hint appended to its last user message and the system prompt first (replacing one the
    environment wrote). Unchanged when both are None, so a raw-text prompt stays raw text."""
    if hint is None and system_prompt is None:
        return prompt
    messages = as_messages(prompt)
    if hint is not None:
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last is None:
            raise ValueError("env.args.hint: the environment's prompt has no user message to append it to")
        messages[last] = {**messages[last], "content": f"{messages[last]['content']}\n{hint}"}
    if system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}, *(m for m in messages if m["role"] != "system")]
    return messages


class Instructed:
    """An environment whose prompts carry a hint and/or a system prompt; everything else is the environment's."""

    def __init__(self, env: Any, hint: str | None = None, system_prompt: str | None = None):
        for key, value in (("hint", hint), ("system_prompt", system_prompt)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{key} must be a string, got {value!r}")
        self.env, self.hint, self.system_prompt = env, hint, system_prompt

    def prompt(self, task: Task) -> list[Message] | str:
        return instruct(self.env.prompt(task), self.hint, self.system_prompt)

    def __getattr__(self, name: str) -> Any:
        if name in ("env", "hint", "system_prompt"):  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.env, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("env", "hint", "system_prompt"):
            object.__setattr__(self, name, value)
        else:  # e.g. make_env naming an environment that has no name of its own
            setattr(self.env, name, value)
