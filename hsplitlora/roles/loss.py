"""The loss where the LM head is: on the main server, or on a U-shaped client's tail.

One function, so the party that holds the labels computes the loss the same way wherever
the head sits (a U-shaped run with one client equals centralized LoRA step for step).
"""

from __future__ import annotations

import torch

from hsplitlora.models.split import ServerSegment
from hsplitlora.runtime.compile import compiled_blocks
from hsplitlora.runtime.optim import autocast, target_logits, token_loss

__all__ = ["segment_loss"]


def segment_loss(segment: ServerSegment, received: torch.Tensor, mask: torch.Tensor,
                 labels: torch.Tensor, *, precision: str, device: torch.device,
                 label_smoothing: float, compile: bool) -> tuple[float, int, torch.Tensor]:
    """Forward ``segment`` (it holds the head) on ``received`` activations, back-propagate
    the token loss into its adapters; returns the loss, its target tokens and
    dL/d(received). Nothing is stepped: the caller's optimizer steps when it is due."""
    hidden = received.to(device).detach().requires_grad_(True)
    segment.train()
    with autocast(precision, device), compiled_blocks(segment.blocks, compile):
        assert segment.lm_head is not None
        logits, targets = target_logits(segment.hidden(hidden, mask.to(device)),
                                        segment.lm_head, labels.to(device))
    loss, tokens = token_loss(logits, targets, label_smoothing)
    loss.backward()
    assert hidden.grad is not None
    return float(loss.detach()), tokens, hidden.grad
