"""Fixtures for the data-layer tests: the repository's E2E copy and an offline tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

E2E_DIR = Path(__file__).resolve().parents[2] / "data" / "e2e"

# Every word and punctuation mark the tokenizer tests use; ids are positions in this list.
TINY_VOCAB = ["[UNK]", "<bos>", "<eos>", "<pad>"] + (
    "Meaning representation : name [ The Vaults ] , eatType pub Description is a . "
    "Blue Spice coffee shop"
).split()


@pytest.fixture(scope="session")
def e2e_dir() -> Path:
    return E2E_DIR


def make_tiny_tokenizer(*, with_pad: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that, like Llama's, puts a BOS in front when asked for special
    tokens, so tests see the prompt get special tokens and the target none."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", TINY_VOCAB.index("<bos>"))]
    )
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", **extra
    )


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """No pad token, like GPT-2 and Llama."""
    return make_tiny_tokenizer(with_pad=False)


@pytest.fixture(scope="session")
def tiny_tokenizer_with_pad() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer(with_pad=True)
