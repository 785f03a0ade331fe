"""Held-out loss and perplexity, computed the same way for every mode."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hsplitlora.data.tokenize import collate
from hsplitlora.runtime.optim import autocast, causal_lm_loss

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    features: Sequence[dict[str, list[int]]],
    *,
    pad_id: int,
    batch_size: int = 8,
    precision: str = "bf16",
    device: torch.device | str = "cpu",
    multiple: int = 1,
) -> tuple[float, float]:
    """Token-level mean loss on target tokens only, and its exponential.

    Every batch's mean is re-weighted by its number of target tokens, so the result does
    not depend on the batch size or on how padding falls (``multiple``: the training
    batches' ``data.pad_to_multiple_of``, so evaluation meets the same widths).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in
                     collate(features[i : i + batch_size], pad_id=pad_id,
                             multiple=multiple).items()}
            with autocast(precision, device):
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"], use_cache=False).logits
            loss, n = causal_lm_loss(logits, batch["labels"])
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no target tokens to evaluate")
    mean = total / count
    return mean, math.exp(mean)
