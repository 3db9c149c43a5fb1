"""A character-level tokenizer over printable ASCII, with a chat template, built locally (no hub).

One token per character keeps tiny models honest on digit and string tasks (no BPE merges hiding the structure)
and makes every task's alphabet available without training. It is an ordinary `tokenizers` object wrapped in a
transformers fast tokenizer, so `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip it.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, END = "<|pad|>", "<|unk|>", "<|end|>"
SPECIAL_TOKENS = [PAD, UNK, END, "<|user|>", "<|assistant|>", "<|system|>"]
CHARACTERS = [chr(i) for i in range(32, 127)] + ["\n"]

# Roles become single special tokens; every turn ends with <|end|>, which is also the EOS the sampler stops on.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=END)
    fast.chat_template = CHAT_TEMPLATE
    return fast
