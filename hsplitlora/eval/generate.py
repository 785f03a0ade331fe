"""Decoding on the assembled model (base + adapters), with the E2E conventions as defaults."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["GenerationSettings", "generate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """Defaults follow SplitLoRA's E2E decoding: beam 10, length penalty 0.8,
    no-repeat-ngram 4, 64 new tokens. ``num_beams=1`` is greedy."""

    num_beams: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,  # noqa: ANN001 - any HF tokenizer
    prompts: Sequence[str],
    settings: GenerationSettings = GenerationSettings(),
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> list[str]:
    """Continue each prompt; returns only the new text, stripped, cut at the first newline.

    Prompts are left-padded in a batch so every continuation starts at the same column.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    out: list[str] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), disable=not show_progress,
                      desc="generate"):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt",
                            padding=True).to(device)
            ids = model.generate(
                **enc,
                num_beams=settings.num_beams,
                length_penalty=settings.length_penalty,
                no_repeat_ngram_size=settings.no_repeat_ngram_size,
                max_new_tokens=settings.max_new_tokens,
                do_sample=False,
                early_stopping=settings.num_beams > 1,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = ids[:, enc["input_ids"].shape[1]:]
            for text in tokenizer.batch_decode(new, skip_special_tokens=True):
                out.append(text.strip().split("\n")[0].strip())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
