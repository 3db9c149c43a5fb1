from posttrain.models.load import (
    attention_for,
    bf16_is_fast,
    load_model,
    load_tokenizer,
    resolve_bf16,
    resolve_device,
    resolve_model_path,
)
from posttrain.models.presets import PRESETS

__all__ = ["PRESETS", "attention_for", "bf16_is_fast", "load_model", "load_tokenizer", "resolve_bf16",
           "resolve_device", "resolve_model_path"]
