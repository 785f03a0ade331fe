"""Hub-ready outputs: the adapter loads with AutoPeftModelForCausalLM, and `export
--merged` writes a standalone model with the trained logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hsplitlora.cli import app
from hsplitlora.config import RunConfig
from hsplitlora.train.run import train
from tests.conftest import E2E, tiny_model


def _train(tmp_path, model_dir, mode="splitlora"):
    cfg = RunConfig.model_validate({
        "model": {"name": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": None},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 40, "max_length": 160},
        "train": {"mode": mode, "num_clients": 2, "cut": 2, "steps": 3, "batch_size": 2,
                  "agg_interval": 2, "lr": 0.01, "precision": "fp32"},
        "eval": {"max_examples": 0},
        "output": {"dir": str(tmp_path / "runs"), "name": "run", "sample_prompt": None},
    })
    return train(cfg, show_progress=False)


@pytest.fixture
def tiny_gpt2_dir(tmp_path, tiny_tokenizer):
    out = tmp_path / "tiny-gpt2"
    tiny_model("gpt2").save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_loads_with_auto_peft_and_merged_export_keeps_the_logits(
        tmp_path, tiny_llama_dir, tiny_gpt2_dir, arch):
    from peft import AutoPeftModelForCausalLM

    model_dir = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    result = _train(tmp_path, model_dir)
    trained = result.model.eval()(input_ids=IDS).logits
    adapter = tmp_path / "runs" / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(model_dir.resolve())

    auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    torch.testing.assert_close(auto(input_ids=IDS).logits, trained, atol=1e-5, rtol=0)

    out = tmp_path / "merged"
    cli = CliRunner().invoke(app, ["export", str(tmp_path / "runs" / "run"), "--merged",
                                   str(out)])
    assert cli.exit_code == 0, cli.output
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids=IDS).logits, trained, atol=1e-5, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).eos_token_id == 1

    again = CliRunner().invoke(app, ["export", str(tmp_path / "runs" / "run"), "--merged",
                                     str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert (out / "config.json").is_file()  # nothing lost


def test_export_assembles_a_deployments_two_halves_into_the_peft_adapter(tmp_path,
                                                                         tiny_llama_dir):
    from peft import AutoPeftModelForCausalLM

    result = _train(tmp_path, tiny_llama_dir)
    trained = result.model.eval()(input_ids=IDS).logits
    run = tmp_path / "runs" / "run"
    state = {k.removeprefix("base_model.model."): v
             for k, v in load_file(run / "adapter" / "adapter_model.safetensors").items()}
    client = {k: v for k, v in state.items() if int(k.split(".")[2]) < 2}
    server = {k: v for k, v in state.items() if k not in client}
    assert client and server
    fed = tmp_path / "runs" / "run-fed"
    fed.mkdir()
    save_file(client, str(fed / "client_adapter.safetensors"))
    save_file(server, str(run / "server_adapter.safetensors"))
    for f in (run / "adapter").iterdir():
        f.unlink()
    (run / "adapter").rmdir()

    cli = CliRunner().invoke(app, ["export", str(run)])  # finds <run>-fed by itself
    assert cli.exit_code == 0, cli.output
    auto = AutoPeftModelForCausalLM.from_pretrained(str(run / "adapter")).eval()
    torch.testing.assert_close(auto(input_ids=IDS).logits, trained, atol=1e-5, rtol=0)
