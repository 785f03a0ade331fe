"""model.quantization: bitsandbytes int8 / NF4 frozen weights under LoRA, and a cost model
that counts exactly what they store."""

from __future__ import annotations

import pytest
import torch
import transformers

from hsplitlora.config import RunConfig
from hsplitlora.hetero.costmodel import (
    ModelDims,
    Workload,
    block_weight_bytes,
    client_memory,
    linear_bytes,
)
from hsplitlora.models.quantize import quantize_blocks, stored_bytes
from tests.conftest import E2E, tiny_model

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("kind", ["none", "int8", "int4"])
def test_cost_model_counts_exactly_the_bytes_a_quantised_block_stores(kind):
    model = tiny_model("llama")
    quantize_blocks(model, range(2), kind, compute_dtype=torch.float32)
    dims = ModelDims.from_config(model.config)
    for i, block in enumerate(model.model.layers):
        expected = block_weight_bytes(dims, 4, kind if i < 2 else "none")
        assert stored_bytes(block) == expected, (kind, i)
    work = Workload(batch=2, seq=16, weight_bytes=4, act_bytes=4, quantization=kind)
    # a client segment holds the embeddings, its blocks and the final norm (kept, unused
    # after the blocks, for backbones that also run it before them)
    measured = stored_bytes(model.model.embed_tokens) + stored_bytes(model.model.norm) + sum(
        stored_bytes(b) for b in model.model.layers[:2])
    assert client_memory(dims, 2, {}, work).frozen_weights == measured


def test_quantised_frozen_weights_free_memory_for_deeper_cuts_on_smollm2():
    config = transformers.LlamaConfig(  # SmolLM2-135M's shape, no download
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    dims = ModelDims.from_config(config)
    assert linear_bytes(576, 576, "int8", 2) / (576 * 576 * 2) == pytest.approx(0.5035, abs=1e-4)
    assert linear_bytes(576, 576, "int4", 2) / (576 * 576 * 2) == pytest.approx(0.2814, abs=1e-4)
    budget = 120 * 2**20

    def deepest(kind):
        work = Workload.for_precision("bf16", batch=4, seq=128, quantization=kind)
        return max(c for c in range(31) if client_memory(dims, c, {}, work).total <= budget)

    assert deepest("none") < deepest("int8") < deepest("int4")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_lora_trains_on_a_quantised_client_and_the_adapter_reloads_onto_it(
        tmp_path, tiny_llama_dir, kind):
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    from hsplitlora.train.run import load_trained, train

    cfg = RunConfig.model_validate({
        "model": {"name": str(tiny_llama_dir), "quantization": kind},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 40, "max_length": 160},
        "train": {"mode": "splitlora", "num_clients": 2, "cut": 2, "steps": 3, "batch_size": 2,
                  "agg_interval": 2, "lr": 0.01, "precision": "fp32"},
        "eval": {"max_examples": 0},
        "output": {"dir": str(tmp_path), "name": kind, "sample_prompt": None},
    })
    result = train(cfg, show_progress=False)
    quantised = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    for i, block in enumerate(result.model.model.layers):
        q_proj = block.self_attn.q_proj
        assert isinstance(q_proj, LoraLayer)
        assert isinstance(q_proj.get_base_layer(), quantised) == (i < 2), i
        assert isinstance(block.mlp.up_proj, quantised) == (i < 2), i
    client_b = result.adapter["model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert client_b.abs().sum() > 0  # B starts at zero: the client side learned
    ids = torch.randint(0, 300, (2, 10))
    reloaded, _, _ = load_trained(tmp_path / kind)
    torch.testing.assert_close(reloaded(input_ids=ids).logits,
                               result.model.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_quantisation_conflicts_are_refused_before_loading(tmp_path):
    from hsplitlora.config import ConfigError
    from hsplitlora.train.preflight import preflight

    def cfg(**train):
        return RunConfig.model_validate({"model": {"quantization": "int4"},
                                         "train": train})

    with pytest.raises(ConfigError, match="not available in mode 'hsplitlora'"):
        preflight(cfg(mode="hsplitlora"), tiny_model("llama").config)
    with pytest.raises(ConfigError, match="Conv1D layers are not supported"):
        preflight(cfg(), tiny_model("gpt2").config)
