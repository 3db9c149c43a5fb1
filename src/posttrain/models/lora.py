"""LoRA adapters through PEFT ([model.lora]): the base weights stay frozen, only the adapters train.

    model = attach_lora(base, cfg.model.lora)                      # a fresh adapter (B = 0: the base model's outputs)
    model = attach_lora(base, cfg.model.lora, adapter_dir=ckpt)    # the adapter of a checkpoint, trainable again
    merged_copy(model)                                             # a plain transformers model, adapters folded in

A LoRA run's checkpoints hold the adapter (adapter_config.json + adapter_model.safetensors) and the tokenizer, not
the base weights: the base is the recipe's model.path, loaded again on resume. The Learner's weights() are then
the adapter tensors only, and that is what an engine receives after each update. The run's final/ directory holds the
merged model (loadable by AutoModelForCausalLM, as every posttrain command expects) and final/adapter/ the adapter.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from posttrain.errors import MissingExtraError, UserError

if TYPE_CHECKING:
    from posttrain.config import LoraConfig

def _peft():
    try:
        import peft
    except ImportError:
        raise MissingExtraError("[model.lora] needs PEFT: pip install peft (or pip install 'posttrain[lora]')") from None
    return peft


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def attach_lora(model: nn.Module, cfg: LoraConfig, *, adapter_dir: Path | None = None) -> nn.Module:
    """Wrap `model` with a LoRA adapter: a new one, or the one saved in `adapter_dir` (a checkpoint)."""
    peft = _peft()
    with warnings.catch_warnings():  # PEFT calls a transformers method that warns of its own rename
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        if adapter_dir is not None:
            return peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        target: str | list[str] = cfg.target_modules
        try:
            config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                     target_modules=target, bias="none", task_type="CAUSAL_LM")
            return peft.get_peft_model(model, config)
        except ValueError as e:  # e.g. a target module name the model does not have
            raise UserError(f"model.lora.target_modules={target!r}: {str(e).splitlines()[0]}") from None


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain transformers model with every adapter folded into its base weights (W + B A * alpha / r)."""
    return copy.deepcopy(model).merge_and_unload()


def describe(model: nn.Module) -> dict[str, Any]:
    """Trainable / total parameter counts, for the run log."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}
