"""Policies: built-in presets, real models fetched by name (model sources), local Hugging Face checkpoints, GGUF
conversion, and how batches are laid out.

The names below load on first use, so importing a light submodule (models.layout) does not import transformers.
"""

from importlib import import_module
from typing import Any

_LAZY = {name: "posttrain.models.load" for name in (
    "attention_for", "bf16_is_fast", "explain_bf16", "load_model", "load_tokenizer", "resolve_bf16", "resolve_device",
    "resolve_model_path", "check_same_tokenizer")} | {"PRESETS": "posttrain.models.presets"} | {
    "SOURCES": "posttrain.models.sources", "model_note": "posttrain.models.sources"}

__all__ = ["PRESETS", "SOURCES", "attention_for", "bf16_is_fast", "check_same_tokenizer", "explain_bf16", "load_model",
           "load_tokenizer", "model_note", "resolve_bf16", "resolve_device", "resolve_model_path"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'posttrain.models' has no attribute {name!r}")
