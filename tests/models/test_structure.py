"""Structure discovery, per-layer facts at every cut, and clear refusals."""

import pytest
import torch
import transformers

from hsplitlora.models.lora import LoraSettings, attach_lora, lora_parameters
from hsplitlora.models.split import SplitError, arch_spec, split_model
from hsplitlora.models.structure import discover


def _gemma2(sliding_window: int = 4) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=sliding_window, vocab_size=320)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _split_logits(model, cut, ids, mask=None):
    client, server = split_model(model, cut)
    return server(client(ids, mask), mask)


def test_gemma2_sliding_layers_are_right_at_odd_cuts():
    # The layer types alternate sliding/full; a server starting at block 1 or 3 must
    # read the type of its global block, not of its local index (issue 14).
    model = _gemma2()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits
    for cut in range(5):
        torch.testing.assert_close(_split_logits(model, cut, ids), ref, atol=1e-5, rtol=0,
                                   msg=f"cut {cut}")
    _, server = split_model(model, 1)
    assert server.backbone.config.layer_types == model.config.layer_types[1:]


def test_the_head_keeps_what_the_causal_lm_does_after_it():
    # Gemma 2 soft-caps its logits at 30: with logits far above that, a bare lm_head
    # would be off by tens; the server's head runs the causal LM's own forward.
    model = _gemma2(sliding_window=64)
    with torch.no_grad():
        model.lm_head.weight.mul_(400)
    ids = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits
    assert ref.abs().max() > 25
    torch.testing.assert_close(_split_logits(model, 2, ids), ref, atol=1e-4, rtol=0)
    _, server = split_model(model, 2)
    hidden = torch.randn(5, 32)  # the training loop's [n, d] target positions
    assert server.lm_head(hidden).shape == (5, 320)
    assert set(dict(server.named_parameters())) >= {"lm_head.weight"} or \
        server.lm_head.weight.data_ptr() == server.backbone.embed_tokens.weight.data_ptr()


def test_discovered_structure_of_llama_and_gpt2():
    llama = arch_spec(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64))
    assert (llama.backbone, llama.blocks, llama.final_norm, llama.n_layers, llama.head) == \
        ("model", "layers", "norm", "num_hidden_layers", "lm_head")
    assert llama.targets == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                             "mlp.down_proj")
    assert llama.default_targets == ("self_attn.q_proj", "self_attn.v_proj")
    assert [m.reads for m in llama.matrices] == ["attn_in"] * 3 + ["attn_out"] + \
        ["mlp_in"] * 2 + ["mlp_mid"]
    assert [(m.d_out, m.d_in) for m in llama.matrices][:2] == [(32, 32), (16, 32)]
    gpt2 = arch_spec(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
    assert (gpt2.backbone, gpt2.blocks, gpt2.final_norm, gpt2.n_layers) == \
        ("transformer", "h", "ln_f", "num_hidden_layers")
    assert gpt2.fan_in_fan_out and gpt2.default_targets == ("attn.c_attn",)
    c_attn = gpt2.matrix("attn.c_attn")
    assert [(p.label, p.start, p.stop) for p in c_attn.parts] == \
        [("q", 0, 32), ("k", 32, 64), ("v", 64, 96)]
    assert [m.kind for m in gpt2.matrices] == ["qkv", "o", "up", "down"]


def test_phi3_fused_parts_follow_the_head_counts():
    spec = arch_spec(transformers.Phi3Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, pad_token_id=0))
    qkv = spec.matrix("self_attn.qkv_proj")
    assert [(p.label, p.width) for p in qkv.parts] == [("q", 32), ("k", 16), ("v", 16)]
    assert [p.label for p in spec.matrix("mlp.gate_up_proj").parts] == ["gate", "up"]


def test_encoder_decoder_is_refused_with_the_reason():
    t5 = transformers.T5Config(num_layers=2, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                               vocab_size=64)
    with pytest.raises(SplitError, match=r"'t5'.*(encoder-decoder|no causal LM)"):
        arch_spec(t5)
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        encoder_layers=1, decoder_layers=1, d_model=16, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64))
    with pytest.raises(SplitError, match=r"cannot split architecture 'bart' exactly: it is an "
                                         r"encoder-decoder model"):
        split_model(bart, 1)


def test_multimodal_wrapper_is_refused_naming_the_text_model():
    wrapper = torch.nn.Module()
    wrapper.config = transformers.LlavaConfig()
    with pytest.raises(SplitError, match=r"'llava'.*multimodal wrapper.*text-only"):
        discover(wrapper)


def test_blocks_not_in_one_list_are_refused():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        vocab_size=64))
    layers = model.model.layers
    # one block in the list, the other beside it: the stack is not one list of 2
    model.model.layers = torch.nn.ModuleList([layers[0]])
    model.model.last = layers[1]
    with pytest.raises(SplitError, match=r"'llama'.*not one nn.ModuleList of 2 modules"):
        split_model(model, 1)


def test_discovery_sees_through_lora():
    model = _gemma2()
    before = discover(model)
    attach_lora(model, LoraSettings(r=2, targets=before.targets))
    assert lora_parameters(model)
    assert discover(model).matrices == before.matrices
