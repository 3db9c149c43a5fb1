"""Turning an environment's prompt (chat messages or raw text) into token ids."""

from __future__ import annotations

from posttrain.errors import UserError
from posttrain.records import Message


def render_prompt(tokenizer, prompt: list[Message] | str, *, chat_template: bool = True,
                  max_len: int | None = None) -> list[int]:
    if chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if max_len is not None and len(ids) >= max_len:
        raise UserError(f"a prompt of {len(ids)} tokens does not fit the model's context of {max_len} "
                        f"tokens (prompt starts {text[:60]!r})")
    return ids


def completion_ids(tokenizer, text: str) -> list[int]:
    """A target completion: its tokens followed by EOS, so the model learns to stop."""
    return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
