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


# ChatML, as Qwen writes it (without the default system turn): the BPE preset's chat format, so the subword path
# exercises a template whose turn terminator (<|im_end|>) is not EOS (<|endoftext|>).
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BPE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe_corpus() -> list[str]:
    """Deterministic training text for the BPE preset: questions and worked solutions of the built-in environments
    (arithmetic with all ops, sorting, strings, countdown), rendered in the chat format."""
    import itertools

    from posttrain.envs import make_env

    texts = []
    sources = [("arithmetic", {"digits": [1, 5], "ops": "+-*", "worked": True}), ("sorting", {}), ("strings", {}),
               ("countdown", {})]
    for name, args in sources:
        env = make_env(name, args)
        for task in itertools.islice(env.tasks("train", 0), 2000):
            texts.append(f"<|im_start|>user\n{task.question}<|im_end|>\n<|im_start|>assistant\n"
                         f"{task.solution}<|im_end|>\n")
    return texts


def build_bpe_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on bpe_corpus(), digits kept one per token (as Qwen2 and DeepSeek split
    them, so arithmetic is not hidden behind number tokens), with ChatML special tokens and template."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(bpe_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast
