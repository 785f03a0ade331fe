from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from hsplitlora.data.e2e import format_prompt
from hsplitlora.data.example import DataError, Example
from hsplitlora.data.tokenize import (
    IGNORE_INDEX,
    TokenizedDataset,
    collate,
    pad_id_for,
    tokenize_example,
)

MR = "name[The Vaults], eatType[pub]"
EXAMPLE = Example(format_prompt(MR), " The Vaults is a pub.", {"mr": MR})


def ids(tok: PreTrainedTokenizerFast, words: str) -> list[int]:
    found = tok.convert_tokens_to_ids(words.split())
    assert isinstance(found, list)
    return found


@pytest.fixture
def prompt_ids(tiny_tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """BOS, then the prompt's words and punctuation one token each (16 tokens)."""
    return ids(
        tiny_tokenizer,
        "<bos> Meaning representation : name [ The Vaults ] , eatType [ pub ] Description :",
    )


def test_loss_is_on_the_target_and_eos_only(
    tiny_tokenizer: PreTrainedTokenizerFast, prompt_ids: list[int]
) -> None:
    target_ids = ids(tiny_tokenizer, "The Vaults is a pub . <eos>")  # no BOS on the target
    features = tokenize_example(EXAMPLE, tiny_tokenizer, max_length=64)
    assert features["input_ids"] == prompt_ids + target_ids
    assert features["labels"] == [IGNORE_INDEX] * 16 + target_ids
    assert features["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert features["input_ids"].count(tiny_tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("room", [1, 2, 6])
def test_truncation_cuts_the_end_of_the_target_eos_first(
    tiny_tokenizer: PreTrainedTokenizerFast, prompt_ids: list[int], room: int
) -> None:
    full = tokenize_example(EXAMPLE, tiny_tokenizer, max_length=64)  # 16 prompt + 7 target
    cut = tokenize_example(EXAMPLE, tiny_tokenizer, max_length=16 + room)
    assert cut["input_ids"] == full["input_ids"][: 16 + room]
    assert cut["labels"] == full["labels"][: 16 + room]
    assert (cut["input_ids"][-1] == tiny_tokenizer.eos_token_id) == (room >= 7)


def test_exact_fit_keeps_eos(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    features = tokenize_example(EXAMPLE, tiny_tokenizer, max_length=23)
    assert len(features["input_ids"]) == 23
    assert features["labels"][-1] == tiny_tokenizer.eos_token_id


@pytest.mark.parametrize("max_length", [15, 16])
def test_prompt_that_fills_max_length_is_an_error(
    tiny_tokenizer: PreTrainedTokenizerFast, max_length: int
) -> None:
    with pytest.raises(DataError, match=f"16 tokens.*max_length={max_length}; raise max_length"):
        tokenize_example(EXAMPLE, tiny_tokenizer, max_length=max_length)


def test_empty_target_learns_only_to_stop(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    features = tokenize_example(Example(EXAMPLE.prompt, "", {}), tiny_tokenizer, 64)
    assert features["labels"] == [IGNORE_INDEX] * 16 + [tiny_tokenizer.eos_token_id]


def test_tokenizer_without_eos_is_rejected(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    assert no_eos.eos_token_id is None
    with pytest.raises(ValueError, match="no eos_token"):
        tokenize_example(EXAMPLE, no_eos, 64)


def test_collate_right_pads_with_masked_labels() -> None:
    batch = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = collate(batch, pad_id=2)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=0)


def test_collate_rounds_the_width_up_to_the_multiple() -> None:
    batch = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
             {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=2, multiple=4)
    assert out["input_ids"].tolist() == [[5, 6, 7, 2], [8, 2, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert out["labels"][:, 3].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    # a width already on the multiple stays; 1 is the plain longest-example width
    assert collate(batch, pad_id=2, multiple=3)["input_ids"].shape == (2, 3)
    assert collate(batch, pad_id=2, multiple=1)["input_ids"].shape == (2, 3)
    with pytest.raises(ValueError, match="at least 1"):
        collate(batch, pad_id=2, multiple=0)


def test_pad_id_falls_back_to_eos(
    tiny_tokenizer: PreTrainedTokenizerFast, tiny_tokenizer_with_pad: PreTrainedTokenizerFast
) -> None:
    assert pad_id_for(tiny_tokenizer) == tiny_tokenizer.eos_token_id == 2
    assert pad_id_for(tiny_tokenizer_with_pad) == tiny_tokenizer_with_pad.pad_token_id == 3


def test_dataset_and_dataloader_give_padded_batches(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    short = Example(format_prompt("name[Blue Spice]"), " Blue Spice .", {})
    dataset = TokenizedDataset([EXAMPLE, short], tiny_tokenizer, max_length=64)
    assert len(dataset) == 2
    assert dataset[0] == tokenize_example(EXAMPLE, tiny_tokenizer, 64)
    pad = functools.partial(collate, pad_id=pad_id_for(tiny_tokenizer))
    loader = DataLoader(dataset, batch_size=2, collate_fn=pad)
    batch = next(iter(loader))
    lengths = [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]  # 23 and 14
    assert batch["input_ids"].shape == (2, 23)
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["input_ids"][1, 14:].tolist() == [tiny_tokenizer.eos_token_id] * 9
    # The only EOS that is learned is the real one closing each text.
    eos_labels = (batch["labels"] == tiny_tokenizer.eos_token_id).sum(dim=1)
    assert eos_labels.tolist() == [1, 1]


def test_dataset_names_the_example_whose_prompt_is_too_long(
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    short = Example("Blue", " Spice", {})
    with pytest.raises(DataError, match="^example 1: the prompt alone is 16 tokens"):
        TokenizedDataset([short, EXAMPLE], tiny_tokenizer, max_length=10)


def test_dataset_warns_about_truncated_examples(
    tiny_tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    short = Example(format_prompt("name[Blue Spice]"), " Blue Spice .", {})  # 14 tokens
    with caplog.at_level(logging.WARNING, logger="hsplitlora.data.tokenize"):
        TokenizedDataset([EXAMPLE, short], tiny_tokenizer, max_length=20)
    assert "1 of 2 examples were cut at max_length=20" in caplog.text
