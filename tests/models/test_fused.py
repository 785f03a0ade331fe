"""LoRA on parts of a fused matrix, against a loralib-style MergedLinear built by hand."""

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hsplitlora.config import RunConfig
from hsplitlora.models.lora import (
    LoraSettings,
    attach_lora,
    load_lora_state,
    lora_parameters,
    lora_state,
    matrix_shapes,
    merge_base_update,
    parts_as_whole,
    save_peft_adapter,
)
from hsplitlora.models.split import arch_spec, split_model
from hsplitlora.train.run import train
from tests.conftest import E2E, tiny_model

R, ALPHA, D = 4, 8.0, 32  # tiny GPT-2: n_embd 32, c_attn is (32 -> 96)
QV = ("attn.c_attn:q", "attn.c_attn:v")


class MergedLinear(nn.Module):
    """loralib's MergedLinear(enable_lora=[True, False, True], fan_in_fan_out=True) on a
    GPT-2 Conv1D: one A of 2r rows, one B applied per part by a grouped conv1d."""

    def __init__(self, conv1d: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.conv1d = conv1d
        self.lora_A = nn.Parameter(a.clone())  # (2r, d_in)
        self.lora_B = nn.Parameter(b.clone())  # (2 * d_out / 3, r)
        self.scaling = ALPHA / R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        after_a = F.linear(x, self.lora_A)
        after_b = F.conv1d(after_a.transpose(-2, -1), self.lora_B.unsqueeze(-1),
                           groups=2).transpose(-2, -1)
        out = self.conv1d(x)
        pad = out.new_zeros(*out.shape[:-1], out.shape[-1])
        pad[..., :D] = after_b[..., :D]  # enable_lora = [True, False, True]
        pad[..., 2 * D:] = after_b[..., D:]
        return out + pad * self.scaling


def _part_model():
    model = attach_lora(tiny_model("gpt2", layers=2), LoraSettings(r=R, alpha=ALPHA, targets=QV))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.3)
    return model.eval()


def _reference(model):
    ref = copy.deepcopy(tiny_model("gpt2", layers=2)).eval()
    state = lora_state(model)
    for i, block in enumerate(ref.transformer.h):
        key = f"transformer.h.{i}.attn.c_attn"
        a = torch.cat([state[f"{key}:q.lora_A.weight"], state[f"{key}:v.lora_A.weight"]])
        b = torch.cat([state[f"{key}:q.lora_B.weight"], state[f"{key}:v.lora_B.weight"]])
        block.attn.c_attn = MergedLinear(block.attn.c_attn, a, b)
    for n, p in ref.named_parameters():
        p.requires_grad_("lora_" in n)
    return ref


def _ids():
    return torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(3))


def test_q_and_v_parts_match_loralib_merged_linear_in_logits_and_gradients():
    model, ids = _part_model(), _ids()
    ref = _reference(model)
    out, expected = model(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    out.square().mean().backward()
    expected.square().mean().backward()
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for i, block in enumerate(ref.transformer.h):
        key = f"transformer.h.{i}.attn.c_attn"
        grad_a, grad_b = block.attn.c_attn.lora_A.grad, block.attn.c_attn.lora_B.grad
        for ab, grad in (("A", grad_a), ("B", grad_b)):
            mine = torch.cat([ours[f"{key}.lora_{ab}.{part}.weight"] for part in "qv"])
            torch.testing.assert_close(mine, grad, atol=1e-6, rtol=1e-4)


def test_trainable_parameters_are_the_papers_count():
    # SplitLoRA's GPT-2: q and v each get A (r x d) and B (d x r): 4 r d per block.
    model = _part_model()
    assert sum(p.numel() for p in lora_parameters(model)) == 2 * 4 * R * D
    assert set(matrix_shapes(model, QV)) == {
        f"transformer.h.{i}.attn.c_attn:{p}" for i in range(2) for p in "qv"}
    assert matrix_shapes(model, QV)["transformer.h.0.attn.c_attn:q"] == (D, D)


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_part_adapters_split_exactly(cut):
    model, ids = _part_model(), _ids()
    expected = model(input_ids=ids).logits
    client, server = split_model(model, cut)
    torch.testing.assert_close(server(client(ids)), expected, atol=1e-5, rtol=0)
    assert set(lora_state(client)) | set(lora_state(server)) == set(lora_state(model))


def test_part_adapters_export_to_peft_exactly(tmp_path):
    model, ids = _part_model(), _ids()
    settings = LoraSettings(r=R, alpha=ALPHA, targets=QV)
    with pytest.raises(ValueError, match="pass the model's spec"):
        save_peft_adapter(lora_state(model), settings, tmp_path)
    state, alphas = parts_as_whole(lora_state(model), settings, arch_spec(model))
    assert state["transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2 * R, D)
    assert state["transformer.h.0.attn.c_attn.lora_B.weight"].shape == (3 * D, 2 * R)
    save_peft_adapter(lora_state(model), settings, tmp_path, fan_in_fan_out=True,
                      spec=arch_spec(model))
    loaded = peft.PeftModel.from_pretrained(tiny_model("gpt2", layers=2), str(tmp_path)).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                               atol=1e-5, rtol=0)


def test_a_part_update_merges_into_its_rows_only():
    model = tiny_model("gpt2", layers=2)
    before = model.transformer.h[1].attn.c_attn.weight.clone()  # Conv1D: (in, out)
    update = torch.ones(D, D)
    merged = merge_base_update(model, {"transformer.h.1.attn.c_attn:v": update}, 1,
                               fan_in_fan_out=True)
    after = model.transformer.h[1].attn.c_attn.weight
    assert merged == ["transformer.h.1.attn.c_attn:v"]
    torch.testing.assert_close(after[:, 2 * D:], before[:, 2 * D:] + 1)
    assert torch.equal(after[:, :2 * D], before[:, :2 * D])


def test_an_unknown_part_names_the_parts_there_are():
    with pytest.raises(ValueError, match=r"attn\.c_attn:x.*parts of fused ones.*c_attn:q"):
        attach_lora(tiny_model("gpt2", layers=1), LoraSettings(targets=("attn.c_attn:x",)))


def test_splitlora_trains_gpt2_part_adapters_end_to_end(tiny_tokenizer, tmp_path):
    cfg = RunConfig.model_validate({
        "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "targets": list(QV)},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 40, "max_length": 96},
        "train": dict(mode="splitlora", num_clients=2, cut=1, steps=2, batch_size=2,
                      agg_interval=1, lr=5e-3, precision="fp32", warmup_steps=1, seed=3),
        "eval": {"max_examples": 0},
        "output": {"sample_prompt": None},
    })
    result = train(cfg, model=tiny_model("gpt2", layers=2), tokenizer=tiny_tokenizer,
                   write=False, show_progress=False)
    assert set(result.adapter) == {f"transformer.h.{i}.attn.c_attn:{p}.lora_{ab}.weight"
                                   for i in range(2) for p in "qv" for ab in "AB"}
    assert any(v.abs().sum() > 0 for k, v in result.adapter.items() if "lora_B" in k)
    model = tiny_model("gpt2", layers=2)
    save_peft_adapter(result.adapter, LoraSettings(r=R, alpha=ALPHA, targets=QV), tmp_path,
                      fan_in_fan_out=True, spec=arch_spec(model))
    loaded = peft.PeftModel.from_pretrained(model, str(tmp_path)).eval()
    trained = attach_lora(tiny_model("gpt2", layers=2), LoraSettings(r=R, alpha=ALPHA,
                                                                      targets=QV))
    load_lora_state(trained, result.adapter)
    ids = _ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, trained.eval()(input_ids=ids).logits,
                               atol=1e-5, rtol=0)
