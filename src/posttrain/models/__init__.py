from posttrain.models.load import load_model, load_tokenizer, resolve_model_path
from posttrain.models.presets import PRESETS

__all__ = ["PRESETS", "load_model", "load_tokenizer", "resolve_model_path"]
