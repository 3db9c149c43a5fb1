"""Turning an environment's prompt (chat messages or raw text) into token ids, and a target completion into the
tokens SFT trains on, in the format of the model's own tokenizer.

Chat format (model.chat_template = true): the tokenizer's template renders the prompt with the assistant turn
opened; an SFT target ends with the template's end-of-turn token (`<|im_end|>` for ChatML, `<|eot_id|>` for
Llama-3), the token generation stops on. Raw text (false): the prompt is the text itself, with the BOS token
first when the tokenizer puts one there (Llama-3 base does; base models degrade without it), and the target ends
with EOS.
"""

from __future__ import annotations

import functools

from posttrain.errors import UserError
from posttrain.records import Message

_PROBE = "\u2063posttrain-probe\u2063"  # text no template rewrites, to find what follows an assistant turn


def render_prompt(tokenizer, prompt: list[Message] | str, *, chat_template: bool = True,
                  max_len: int | None = None) -> list[int]:
    """The prompt's token ids. Its messages' text is text: a control token written in it (`<|im_end|>`, a forged
    turn) is encoded as ordinary characters, and only the template's own control tokens are real."""
    if chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if any(_holds_control_text(tokenizer, m["content"]) for m in messages):
            ids = _template_with_plain_contents(tokenizer, messages)
        else:  # the usual case, and byte-for-byte the tokens it always had
            ids = tokenizer(text, add_special_tokens=False).input_ids  # the template writes its own BOS, if any
    else:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
        bos = bos_id(tokenizer)
        if bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
    if max_len is not None and len(ids) >= max_len:
        raise UserError(f"a prompt of {len(ids)} tokens does not fit the model's context of {max_len} "
                        f"tokens (prompt starts {text[:60]!r})")
    return ids


def _control_texts(tokenizer) -> list[str]:
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return [t.content for i, t in tokenizer.added_tokens_decoder.items() if i in special and t.content]


def _holds_control_text(tokenizer, content: str) -> bool:
    return any(word in content for word in _control_texts(tokenizer))


_SLOT = "\u2063posttrain-slot-{}\u2063"


def _template_with_plain_contents(tokenizer, messages: list[Message]) -> list[int]:
    """The rendered template with each message's content encoded on its own with special tokens split, so that
    text in a message cannot close its turn or open another."""
    slots = [_SLOT.format(i) for i in range(len(messages))]
    text = tokenizer.apply_chat_template([{**m, "content": slot} for m, slot in zip(messages, slots)],
                                         add_generation_prompt=True, tokenize=False)
    ids: list[int] = []
    for slot, message in zip(slots, messages):
        before, found, text = text.partition(slot)
        if not found:  # the template dropped this message (e.g. a system prompt it does not render)
            text = before
            continue
        ids += tokenizer(before, add_special_tokens=False).input_ids
        ids += tokenizer(message["content"], add_special_tokens=False, split_special_tokens=True).input_ids
    return ids + tokenizer(text, add_special_tokens=False).input_ids


def completion_ids(tokenizer, text: str, *, chat_template: bool = True) -> list[int]:
    """A target completion: its tokens followed by the token that ends a turn (chat) or EOS (raw text), so the
    model learns to stop where generation stops."""
    end = end_of_turn_id(tokenizer) if chat_template else None
    return tokenizer(text, add_special_tokens=False).input_ids + [end if end is not None else tokenizer.eos_token_id]


# BOS tokens of model families trained with BOS before every document (Llama-3, Llama-2/Mistral, Gemma): a tokenizer
# converted from a GGUF file may carry the token but not the flag that adds it, and such a model degrades without it
FAMILY_BOS = frozenset({"<|begin_of_text|>", "<s>", "<bos>"})


@functools.lru_cache(maxsize=16)
def bos_id(tokenizer) -> int | None:
    """The BOS id that raw text starts with: the tokenizer's when it puts one before ordinary text
    (add_special_tokens=True) or when its BOS is one of FAMILY_BOS whatever its flag says, else None (SmolLM2's and
    Qwen2's released tokenizers add none)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    if getattr(tokenizer, "bos_token", None) in FAMILY_BOS:
        return bos
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bos if ids[:1] == [bos] else None


@functools.lru_cache(maxsize=16)
def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message (its end of turn), or None
    when the template has none (then EOS ends the turn)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        after = _after_assistant_turn(tokenizer)
    except Exception:  # noqa: BLE001 - a template that cannot render an assistant turn has no terminator to find
        return None
    if after is None:
        return None
    ids = tokenizer(after, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in special else None


def _after_assistant_turn(tokenizer, following: list[Message] | None = None,
                          add_generation_prompt: bool = False) -> str | None:
    """The text the chat template writes after an assistant message (and the `following` messages), found by
    rendering a probe assistant turn; None when the template drops the probe."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE},
                                          *(following or [])], add_generation_prompt=add_generation_prompt,
                                         tokenize=False)
    return text.split(_PROBE, 1)[1] if _PROBE in text else None


def observation_ids(tokenizer, text: str, *, chat_template: bool, closed: bool) -> list[int]:
    """A multi-turn environment's reply as the tokens that follow the policy's turn (rollout/episodes.py): in chat
    format the rest of the template's end of the assistant turn (without its end-of-turn token when the policy's
    own stop token already `closed` the turn), the user turn holding `text` and the opened assistant turn; in raw
    text, the text itself."""
    if not chat_template:
        return tokenizer(text, add_special_tokens=False).input_ids
    after = _after_assistant_turn(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    if after is None:
        raise UserError("the chat template drops assistant turns, so a multi-turn episode cannot be rendered; "
                        "set model.chat_template = false")
    ids = tokenizer(after, add_special_tokens=False).input_ids
    end = end_of_turn_id(tokenizer)
    return ids[1:] if closed and end is not None and ids[:1] == [end] else ids


def stop_token_ids(tokenizer, generation_config=None, *, chat_template: bool = True) -> set[int]:
    """Every token that ends a completion: the tokenizer's EOS, the generation config's eos ids (instruct models
    list several), and, in chat format, the template's end-of-turn token."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids |= set(eos if isinstance(eos, list) else [eos])
    if chat_template:
        ids.add(end_of_turn_id(tokenizer))
    return {i for i in ids if i is not None}


def tokenizer_summary(tokenizer, stop_ids: set[int], *, chat_template: bool) -> dict:
    """What the run's tokenizer does at the edges of a completion, for run.log and config.json: the tokens that
    end generation, the token SFT targets end with, and the token prompts start with (None: no BOS)."""
    def named(i: int | None) -> dict | None:
        return None if i is None else {"id": int(i), "token": tokenizer.convert_ids_to_tokens(int(i))}

    end = end_of_turn_id(tokenizer) if chat_template else None
    ids = render_prompt(tokenizer, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
                        chat_template=chat_template)
    bos = tokenizer.bos_token_id
    # a BOS starts the prompt once; a "BOS" that opens every turn (SmolLM2's <|im_start|>) is the template's own
    starts_with_bos = bos is not None and ids[:1] == [bos] and ids.count(bos) == 1
    return {"chat_template": chat_template, "stop_tokens": [named(i) for i in sorted(stop_ids)],
            "sft_target_end": named(end if end is not None else tokenizer.eos_token_id),
            "prompt_bos": named(bos) if starts_with_bos else None}


def tokenizer_line(summary: dict) -> str:
    """One line of tokenizer_summary: 'tokenizer: generation stops on <|im_end|> (2), ...'."""
    def show(t: dict) -> str:
        return f"{t['token']} ({t['id']})"

    bos = summary["prompt_bos"]
    return (f"tokenizer: generation stops on {', '.join(show(t) for t in summary['stop_tokens'])}; SFT targets end "
            f"with {show(summary['sft_target_end'])}; prompts start with "
            f"{'BOS ' + show(bos) if bos else 'no BOS'} ({'chat template' if summary['chat_template'] else 'raw text'})")


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
