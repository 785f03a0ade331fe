"""The coverage sweep (hsplitlora.models.coverage): split exactness across architectures.

The default run checks a few architectures of each kind (dense, grouped-query, fused
projections, sliding windows, soft-capping, mixture-of-experts, learned positions) in a
few seconds; ``pytest -m sweep`` runs the whole causal-LM registry (minutes) and asserts
the 90 % target and that none is wrong. ``scripts/coverage_sweep.py`` prints the table.
"""

import pytest
from transformers import AutoModelForCausalLM

from hsplitlora.hetero.costmodel import ModelDims
from hsplitlora.models import coverage
from hsplitlora.models.coverage import ATOL, check, registry, text_decoder, tiny_config
from hsplitlora.models.split import split_model
from hsplitlora.models.structure import SplitError, arch_spec

FAST = ["gemma2", "phi3", "opt", "mixtral", "gpt_neox", "bloom", "olmo2", "starcoder2",
        "cohere_compass_text", "dbrx"]


@pytest.mark.parametrize("model_type", FAST)
def test_representative_architectures_split_exactly_at_every_cut(model_type):
    result = check(model_type)
    assert result.status == "exact", result
    assert result.logit_err <= ATOL and result.grad_err <= ATOL


def test_an_architecture_that_cannot_be_cut_is_refused_with_its_reason():
    result = check("zamba")
    assert result.status == "refused"
    assert "cannot split architecture 'zamba' exactly: its hybrid blocks call one shared" \
        in result.reason


def test_qwen4_exp_with_per_layer_embeddings_is_refused_by_its_config_field():
    config = tiny_config("qwen4_exp_text", ple_layer_ids=[1], ple_embed_dim=8,
                         ngram_vocab_size_base=1000, heads_per_ngram=2, split_ngram_parts=4)
    with pytest.raises(SplitError, match="per-layer inputs.*sets ple_layer_ids"):
        arch_spec(config)


@pytest.mark.sweep
def test_the_registry_sweep_meets_the_target_and_nothing_is_wrong():
    results = [check(m) for m in registry()]
    wrong = [r for r in results if r.status == "wrong"]
    assert not wrong, wrong
    decoders = [r for r in results if text_decoder(r.model_type) and r.status != "skipped"]
    exact = [r for r in decoders if r.status == "exact"]
    assert len(exact) >= 0.9 * len(decoders), [r.model_type for r in decoders
                                              if r.status != "exact"]


def test_emu3_and_fuyu_are_multimodal_entries_and_split_or_refuse_for_that_reason():
    # Emu3's registry config holds an image VQ tokenizer, Fuyu's an image placeholder token
    assert not text_decoder("emu3") and not text_decoder("fuyu")
    assert check("emu3").status == "exact"  # its causal LM is the text model alone
    fuyu = check("fuyu")
    assert fuyu.status == "refused" and "multimodal wrapper" in fuyu.reason


def test_drafters_that_run_on_another_models_states_are_not_counted_as_text_decoders():
    assert not text_decoder("gemma4_assistant") and not text_decoder("gemma4_unified_assistant")
    assert text_decoder("gemma4_text") and text_decoder("llama")


@pytest.mark.parametrize("model_type, changes", [
    ("deepseek_v4", dict(mlp_layer_types=["moe"] * 4)),  # no token-id routed layers
    ("hy_v4", dict(indexer_types=["full"] * 4)),  # every block runs its own indexer
])
def test_hyper_connection_streams_cross_the_cut_exactly(monkeypatch, model_type, changes):
    monkeypatch.setitem(coverage._EXTRA, model_type,
                        {**coverage._EXTRA.get(model_type, {}), **changes})
    spec = arch_spec(tiny_config(model_type))
    assert spec.streams == 4
    assert "self_attn.o_a_proj" not in spec.targets  # a per-group matmul, not a linear map
    result = check(model_type)
    assert result.status == "exact", result
    with pytest.raises(ValueError, match="4 residual streams"):
        ModelDims.from_config(tiny_config(model_type))


@pytest.mark.parametrize("model_type, refused, allowed, why", [
    ("deepseek_v4", [0, 1, 2], [3, 4], "hash_moe layers pick experts by token id"),
    ("hy_v4", [2, 3], [0, 1, 4], "reuses the previous block's indexer top-k"),
])
def test_cuts_that_need_more_than_the_streams_are_refused(model_type, refused, allowed, why):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    for cut in refused:
        with pytest.raises(SplitError, match=why):
            split_model(model, cut)
    for cut in allowed:
        split_model(model, cut)
