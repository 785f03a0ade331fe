"""Tiny randomly initialised models and a tiny tokenizer, so every test runs in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parent.parent
E2E = REPO / "data" / "e2e"


def tiny_config(arch: str, layers: int = 4, vocab: int = 320) -> transformers.PretrainedConfig:
    common = dict(vocab_size=vocab)
    if arch == "gpt2":
        return transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=4, n_positions=256,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=1, eos_token_id=1, **common)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    return cls(num_hidden_layers=layers, hidden_size=32, intermediate_size=64,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=None, eos_token_id=1, pad_token_id=None, **common)


def tiny_model(arch: str, layers: int = 4, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, layers))
    model.config.use_cache = False
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-test on E2E text (no downloads)."""
    from hsplitlora.data.e2e import load_e2e

    examples = load_e2e([E2E / "original" / "devset.csv"])[:400]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([e.prompt + e.target for e in examples],
                            trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<eos>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                                unk_token="<unk>", pad_token="<eos>")
    assert fast.eos_token_id == 1
    return fast


@pytest.fixture
def tiny_llama_dir(tmp_path: Path, tiny_tokenizer) -> Path:
    """A tiny Llama + tokenizer saved like a hub checkpoint."""
    out = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out
