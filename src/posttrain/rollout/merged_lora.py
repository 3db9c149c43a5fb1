"""Sampling from a LoRA policy at the full model's speed: a plain copy of the model whose projections hold
W + scale * B @ A, refreshed when the adapter changes.

Through PEFT's wrapped layers every decode step runs each adapter as two more small matmuls, and the local engine's
lean decode path (llama_decode.py), which fuses q/k/v and gate/up into one matmul each, cannot take a wrapped layer:
a LoRA policy sampled at 352 tokens/s against the full model's 760 (SmolLM2-135M, bf16, docs/performance.md). The
merged copy is a plain model again. Its cost is one more copy of the weights in memory and a refresh (one
B @ A per adapted layer and a copy) after each update, and an exact comparison of the adapter's tensors before
each generate call. Merging in place (PEFT's merge_adapter / unmerge_adapter)
would avoid the copy but leave the learner's frozen base off by float rounding after every unmerge.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ADAPTER = "default"


def mergeable(policy: Any) -> bool:
    """A PEFT LoRA policy whose only trainable tensors are its one adapter's A and B (no DoRA, no
    modules_to_save): what MergedLora reproduces exactly, up to float rounding."""
    config = getattr(policy, "peft_config", {}).get(ADAPTER)
    if config is None or len(policy.peft_config) != 1 or getattr(config, "use_dora", False):
        return False
    if str(getattr(getattr(config, "peft_type", None), "value", "")) != "LORA" or config.modules_to_save:
        return False
    return all("lora_A" in name or "lora_B" in name for name, p in policy.named_parameters() if p.requires_grad)


class MergedLora:
    def __init__(self, policy: Any) -> None:
        from peft.tuners.lora import LoraLayer

        from posttrain.models.lora import merged_copy

        self.model = merged_copy(policy).eval().requires_grad_(False)
        plain = dict(self.model.named_modules())
        self.layers: list[tuple[nn.Linear, Any]] = [(plain[name], module)
                                                    for name, module in policy.get_base_model().named_modules()
                                                    if isinstance(module, LoraLayer)]
        # the adapter's tensors (trainable in the learner's policy, frozen in an engine's private copy), and a copy
        # of them as last folded in: compared exactly before each use (torch's in-place version counters miss the
        # optimizer's writes, so they cannot tell)
        self._adapters = [p for name, p in policy.named_parameters() if "lora_A" in name or "lora_B" in name]
        self._folded: list[torch.Tensor] | None = None
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Fold the adapter in again if any of its tensors changed since the last fold."""
        if self._folded is not None and all(torch.equal(a, b) for a, b in zip(self._adapters, self._folded,
                                                                                 strict=True)):
            return
        for plain, wrapped in self.layers:
            plain.weight.copy_(wrapped.get_base_layer().weight + wrapped.get_delta_weight(ADAPTER))
        self._folded = [p.detach().clone() for p in self._adapters]
