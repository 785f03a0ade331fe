import peft
import pytest
import torch

from hsplitlora.models.lora import (
    LoraSettings,
    attach_lora,
    load_lora_state,
    lora_parameters,
    lora_state,
    save_peft_adapter,
    target_module_names,
)
from hsplitlora.models.split import split_model
from tests.conftest import tiny_model


def test_only_lora_parameters_are_trainable():
    model = attach_lora(tiny_model("llama"), LoraSettings(r=4, targets=("q_proj", "v_proj")))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 4 * 2 * 2  # 4 blocks x (q, v) x (A, B)


def test_per_module_ranks_and_rank_zero():
    ranks = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.q_proj": 0,
             "model.layers.3.mlp.down_proj": 16}
    model = attach_lora(tiny_model("llama"),
                        LoraSettings(r=4, alpha=8, targets=("q_proj", "down_proj"), ranks=ranks))
    state = lora_state(model)
    assert state["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
    assert state["model.layers.3.mlp.down_proj.lora_B.weight"].shape == (32, 16)
    assert state["model.layers.2.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert "model.layers.1.self_attn.q_proj.lora_A.weight" not in state
    layer = model.model.layers[3].mlp.down_proj
    assert layer.scaling["default"] == pytest.approx(8 / 16)


def test_gpt2_targets_stay_inside_blocks():
    names = target_module_names(tiny_model("gpt2", layers=2), ("mlp.c_proj", "attn.c_attn"))
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
                     "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    with pytest.raises(ValueError, match="unknown LoRA target.*lm_head"):
        target_module_names(tiny_model("gpt2"), ("lm_head",))


def test_segment_state_uses_unsplit_names_and_round_trips():
    model = attach_lora(tiny_model("llama"), LoraSettings(r=4))
    client, server = split_model(model, 1)
    c, s = lora_state(client), lora_state(server)
    assert set(c) | set(s) == set(lora_state(model)) and not set(c) & set(s)
    assert all(k.startswith("model.layers.0.") for k in c)
    new = {k: torch.randn_like(v) for k, v in s.items()}
    load_lora_state(server, new)
    for k, v in lora_state(server).items():
        assert torch.equal(v, new[k])
    with pytest.raises(KeyError, match="missing"):
        load_lora_state(server, c)
    bad = dict(new)
    key = next(iter(bad))
    bad[key] = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="expected shape"):
        load_lora_state(server, bad)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_export_loads_on_the_unsplit_base(arch, tmp_path):
    base = tiny_model(arch).eval()
    ranks = {("transformer.h.1.attn.c_attn" if arch == "gpt2"
              else "model.layers.1.self_attn.q_proj"): 2}
    settings = LoraSettings(r=4, alpha=16, ranks=ranks)
    model = attach_lora(tiny_model(arch), settings).eval()
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.3)
    ids = torch.randint(0, 320, (2, 9))
    expected = model(input_ids=ids).logits
    assert not torch.allclose(expected, base(input_ids=ids).logits, atol=1e-3)
    save_peft_adapter(lora_state(model), settings, tmp_path, base_model="tiny",
                      fan_in_fan_out=arch == "gpt2")
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
