"""LoRA on parts of a fused projection (GPT-2's ``c_attn`` q and v rows, Phi-3's ``qkv_proj``).

SplitLoRA's GPT-2 code adapts only the query and value thirds of ``c_attn``, each with its
own rank-r pair (loralib's ``MergedLinear(enable_lora=[True, False, True])``); peft can
only adapt the whole fused matrix. :class:`PartLora` wraps the fused base layer and adds
``B_p A_p x * alpha_p / r_p`` to the output rows of each adapted part ``p``, so the
trainable-parameter count is the paper's: ``r (d_in + d_part)`` per part.

Parameters are named ``<module>.lora_A.<part>.weight`` inside a model; under the unsplit
model's names (:func:`hsplitlora.models.lora.lora_state`) a part is the module
``<module>:<part>``, the name importance scores and planner ranks use for it.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from hsplitlora.models.structure import Part

__all__ = ["PartLora"]


class PartLora(nn.Module):
    """A fused linear (``nn.Linear`` or ``Conv1D``) with LoRA on some of its row parts."""

    def __init__(self, base_layer: nn.Module, parts: dict[Part, tuple[int, float]],
                 *, fan_in_fan_out: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        rows, cols = self.weight.shape
        d_in, self.d_out = (rows, cols) if fan_in_fan_out else (cols, rows)
        self.parts = tuple(sorted(parts, key=lambda p: p.start))
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        for part in self.parts:
            rank, alpha = parts[part]
            a, b = nn.Linear(d_in, rank, bias=False), nn.Linear(rank, part.width, bias=False)
            # peft's (and loralib's) initialisation: A Kaiming-uniform, B zero
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
            self.lora_A[part.label], self.lora_B[part.label] = a, b
            self.scaling[part.label] = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        dropped = self.dropout(x).to(self.lora_A[self.parts[0].label].weight.dtype)
        pieces, at = [], 0
        for part in self.parts:
            if part.start > at:
                pieces.append(out.new_zeros(*out.shape[:-1], part.start - at))
            label = part.label
            delta = self.lora_B[label](self.lora_A[label](dropped)) * self.scaling[label]
            pieces.append(delta.to(out.dtype))
            at = part.stop
        if at < self.d_out:
            pieces.append(out.new_zeros(*out.shape[:-1], self.d_out - at))
        return out + torch.cat(pieces, dim=-1)
