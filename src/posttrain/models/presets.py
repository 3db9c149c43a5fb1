"""Built-in model presets: small Llama-architecture decoders built from a transformers config, no download.

A preset is built once per (name, seed) into a cache directory with `save_pretrained`; from then on it is loaded
like any local checkpoint. Building is deterministic for a seed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.models.tokenizer import build_char_tokenizer

PRESET_VERSION = 2  # bump when a preset's architecture or tokenizer changes, so caches rebuild


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 512


PRESETS: dict[str, Preset] = {
    "tiny-test": Preset(hidden=64, layers=2, heads=4, intermediate=192),  # ~0.1M: unit tests only
    "tiny-3m": Preset(hidden=256, layers=4, heads=4, intermediate=768),  # ~3.2M
    "tiny-25m": Preset(hidden=512, layers=8, heads=8, intermediate=1536),  # ~25M
}


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def preset_dir(name: str, seed: int) -> Path:
    return cache_root() / "presets" / f"{name}-seed{seed}-v{PRESET_VERSION}"


def build_preset(name: str, seed: int, out_dir: Path) -> None:
    spec = PRESETS[name]
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        rope_theta=10000.0,
    )
    fork_devices: list = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_preset(name: str, seed: int) -> Path:
    """Return the directory of a built preset, building it (atomically) if needed."""
    target = preset_dir(name, seed)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_preset(name, seed, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
