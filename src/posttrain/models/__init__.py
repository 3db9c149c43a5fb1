from posttrain.models.load import (
    attention_for,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
)
from posttrain.models.presets import PRESETS

__all__ = ["PRESETS", "attention_for", "load_model", "load_tokenizer", "resolve_device", "resolve_model_path"]
