"""Examples to token ids with the loss on the target only, and right-padded batches."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hsplitlora.data.example import DataError, Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "TokenizedDataset", "collate", "pad_id_for", "tokenize_example"]

logger = logging.getLogger(__name__)

# torch.nn.functional.cross_entropy skips this label, and HF causal LMs use the same default.
IGNORE_INDEX = -100


def tokenize_example(
    ex: Example, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list[int]]:
    """``input_ids`` = prompt (with the tokenizer's special tokens) + target + EOS.

    ``labels`` are IGNORE_INDEX over the prompt, so the model learns to write the description,
    not to echo the MR; the trailing EOS teaches it to stop. Prompt and target are tokenised
    separately so the prompt/target boundary is exact; the target's leading space keeps the
    word boundary a joint tokenisation would have. Sequences longer than `max_length` lose the
    end of the target (EOS first: a cut-off text must not be taught to end there).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a prompt token and a target token); "
                         f"got {max_length}.")
    if ex.segments:
        return _tokenize_segments(ex, tokenizer, max_length)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos_token, so generations could never learn to stop; "
            "set tokenizer.eos_token to the model's end-of-text token."
        )
    prompt_ids = list(tokenizer(ex.prompt, add_special_tokens=True)["input_ids"])
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"the prompt alone is {len(prompt_ids)} tokens, which leaves no room for the target "
            f"within max_length={max_length}; raise max_length above {len(prompt_ids)} "
            f"(prompt starts {ex.prompt[:60]!r})."
        )
    target_ids = list(tokenizer(ex.target, add_special_tokens=False)["input_ids"]) + [eos]
    target_ids = target_ids[: max_length - len(prompt_ids)]
    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def _tokenize_segments(
    ex: Example, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list[int]]:
    """A rendered conversation: each piece tokenised on its own, labels only on the
    trainable (assistant) pieces. The template writes every special token itself (BOS,
    end of turn), so none is added here; the end-of-turn token it puts after each
    assistant turn is part of that turn, which is how the model learns to stop."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trainable in ex.segments:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        input_ids += ids
        labels += ids if trainable else [IGNORE_INDEX] * len(ids)
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    if first >= max_length:
        raise DataError(
            f"the conversation reaches its first assistant turn only after {first} tokens, "
            f"beyond max_length={max_length}; raise data.max_length above {first} "
            f"(conversation starts {ex.segments[0][0][:60]!r}).")
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


class TokenizedDataset(Dataset[dict[str, list[int]]]):
    """Examples tokenised once up front: E2E-sized data fits easily, and errors surface at load."""

    def __init__(
        self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int
    ) -> None:
        self.features: list[dict[str, list[int]]] = []
        for index, ex in enumerate(examples):
            try:
                self.features.append(tokenize_example(ex, tokenizer, max_length))
            except DataError as err:
                raise DataError(f"example {index}: {err}") from err
        # An untruncated example always ends in EOS; a cut one lost it first. A conversation
        # may end in template text, so it counts as cut when it fills max_length.
        truncated = sum(
            1 for ex, f in zip(examples, self.features, strict=True)
            if (len(f["input_ids"]) >= max_length if ex.segments
                else f["labels"][-1] != tokenizer.eos_token_id))
        if truncated:
            logger.warning(
                "%d of %d examples were cut at max_length=%d; raise it to train on whole texts",
                truncated, len(self.features), max_length,
            )

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


def collate(batch: Sequence[Mapping[str, Sequence[int]]], pad_id: int,
            multiple: int = 1) -> dict[str, Tensor]:
    """Right-pad a list of tokenised examples into ``input_ids``, ``attention_mask``, ``labels``.

    Right padding keeps every sequence's positions starting at 0, as in training without
    padding. Pads get IGNORE_INDEX labels and mask 0, so `pad_id` may be the EOS id for
    tokenizers without a pad token (see `pad_id_for`) without teaching EOS at pad positions.
    Use with a DataLoader as ``collate_fn=functools.partial(collate, pad_id=...)``.

    ``multiple`` rounds the width up to a multiple of it (``data.pad_to_multiple_of``):
    the CPU kernels cache per-shape state (oneDNN primitives and their buffers, about
    13 MiB a width on SmolLM2), so a run that meets every width up to ``max_length``
    holds a cache that bucketed widths keep to a few entries (docs/engine.md).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if multiple < 1:
        raise ValueError(f"pad to a multiple of {multiple}: it must be at least 1")
    longest = max(len(item["input_ids"]) for item in batch)
    width = -(-longest // multiple) * multiple
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        length = len(item["input_ids"])
        input_ids[row, :length] = torch.tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(item["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_id_for(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, or its EOS id where it has none (GPT-2, Llama)."""
    for pad_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad_id is not None:
            return int(pad_id)
    raise ValueError("the tokenizer has neither a pad_token nor an eos_token; set one of them.")
