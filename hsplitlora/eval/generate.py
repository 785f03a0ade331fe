"""Decoding on the assembled model (base + adapters), with the E2E conventions as defaults."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["GenerationSettings", "clean_continuation", "generate", "prompt_batches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """Defaults follow SplitLoRA's E2E decoding: beam 10, length penalty 0.8,
    no-repeat-ngram 4, 64 new tokens. ``num_beams=1`` is greedy.

    ``early_stopping`` is transformers' flag: True ends a prompt's search as soon as
    ``num_beams`` finished hypotheses exist (the classic beam search); False keeps going
    while a running beam could still beat the worst finished one.
    """

    num_beams: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    early_stopping: bool = True

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"invalid generation settings {self}: num_beams and max_new_tokens "
                             "must be >= 1 and no_repeat_ngram_size >= 0 (0 = off)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def clean_continuation(text: str) -> str:
    """The first line of a continuation, stripped: an E2E description is one line, and a
    model that keeps going after it (a new "Meaning representation:") must not be scored
    on that."""
    return text.strip().split("\n")[0].strip()


def prompt_batches(
    tokenizer: Any, prompts: Sequence[str], batch_size: int, device: torch.device
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Left-padded batches of prompts of similar length, with their original indices.

    Sorting by token length keeps padding (and so wasted compute) small; left padding puts
    every continuation at the same column. Both decoding paths batch through here, so the
    same prompt always meets the same batch-mates and padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
            yield idx, {"input_ids": enc["input_ids"].to(device),
                        "attention_mask": enc["attention_mask"].to(device)}
    finally:
        tokenizer.padding_side = side


def _pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
               else tokenizer.eos_token_id)


def _hf_kwargs(settings: GenerationSettings, tokenizer: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        num_beams=settings.num_beams,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        repetition_penalty=1.0,
        num_return_sequences=1,
        pad_token_id=_pad_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    if settings.num_beams > 1:  # beam-only flags; transformers warns about them under greedy
        kwargs.update(length_penalty=settings.length_penalty,
                      early_stopping=settings.early_stopping)
    return kwargs


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    settings: GenerationSettings = GenerationSettings(),
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> list[str]:
    """Continue each prompt with transformers' batched beam search (KV cache) or greedy
    decoding; returns only the new text, through :func:`clean_continuation`, in prompt order.

    Every decoding parameter is passed explicitly, so values in a checkpoint's
    ``generation_config.json`` (temperature, repetition penalty, ...) cannot leak in and
    make the split path (:mod:`hsplitlora.eval.split_generate`) disagree.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(prompts)
    beams = settings.num_beams
    try:
        batches = prompt_batches(tokenizer, prompts, batch_size, device)
        total = -(-len(prompts) // batch_size)
        for idx, enc in tqdm(batches, total=total, disable=not show_progress,
                             desc=f"generate (beam {beams})" if beams > 1 else "generate (greedy)"):
            ids = cast(Any, model).generate(**enc, **_hf_kwargs(settings, tokenizer))
            new = ids[:, enc["input_ids"].shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True),
                               strict=True):
                out[i] = clean_continuation(text)
    finally:
        model.train(was_training)
    return out
