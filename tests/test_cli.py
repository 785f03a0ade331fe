import json

import peft
import torch
import transformers
from typer.testing import CliRunner

from hsplitlora.cli import app
from hsplitlora.config import RunConfig
from hsplitlora.train.run import train
from tests.conftest import E2E, tiny_model


def test_cli_train_writes_the_run_folder_and_a_peft_loadable_adapter(tmp_path, tiny_llama_dir):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{name: {tiny_llama_dir}}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
data:
  train_files: [{E2E / 'original' / 'devset.csv'}]
  max_train_examples: 40
  max_length: 160
train: {{mode: splitlora, num_clients: 2, cut: 1, steps: 3, batch_size: 2, agg_interval: 2,
        lr: 0.01, precision: fp32}}
eval: {{max_examples: 8}}
output: {{dir: {tmp_path / 'runs'}, name: tiny, sample_prompt: "name[Aromi], area[city centre]"}}
""")
    result = CliRunner().invoke(app, ["train", "--config", str(cfg), "--no-progress"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert len(steps) == 6
    for key in ("step", "round", "client", "loss", "tokens", "wall", "bytes_up", "bytes_down"):
        assert all(key in r for r in steps), key
    assert all(r["bytes_up"] > r["bytes_down"] > 0 for r in steps)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and "eval_ppl" in summary
    assert "before fine-tuning" in result.output and "after fine-tuning" in result.output

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, 300, (2, 10))
    untuned = base(input_ids=ids).logits
    loaded = peft.PeftModel.from_pretrained(base, str(run / "adapter")).eval()  # mutates base
    assert (loaded(input_ids=ids).logits - untuned).abs().max() > 1e-4


def test_saved_adapter_reproduces_the_trained_model_logits(tmp_path, tiny_tokenizer):
    cfg = RunConfig.model_validate({
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 40, "max_length": 160},
        "train": {"mode": "splitlora", "num_clients": 2, "cut": 2, "steps": 3, "batch_size": 2,
                  "lr": 0.01, "precision": "fp32"},
        "eval": {"max_examples": 0},
        "output": {"dir": str(tmp_path), "name": "api", "sample_prompt": None},
    })
    result = train(cfg, model=tiny_model("gpt2"), tokenizer=tiny_tokenizer, show_progress=False)
    base = tiny_model("gpt2").eval()
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "api" / "adapter")).eval()
    ids = torch.randint(0, 300, (2, 10))
    torch.testing.assert_close(loaded(input_ids=ids).logits,
                               result.model.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train: {mode: nope}\n")
    result = CliRunner().invoke(app, ["train", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "train.mode" in result.output and "splitlora" in result.output


def test_load_trained_rebuilds_the_fine_tuned_model(tmp_path, tiny_llama_dir, tiny_tokenizer):
    from hsplitlora.train.run import load_trained

    cfg = RunConfig.model_validate({
        "model": {"name": str(tiny_llama_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 40, "max_length": 160},
        "train": {"mode": "federated", "num_clients": 2, "steps": 2, "batch_size": 2,
                  "lr": 0.01, "precision": "fp32"},
        "eval": {"max_examples": 0},
        "output": {"dir": str(tmp_path), "name": "fed", "sample_prompt": None},
    })
    result = train(cfg, show_progress=False)
    model, _, loaded_cfg = load_trained(tmp_path / "fed")
    assert loaded_cfg == cfg
    ids = torch.randint(0, 300, (2, 10))
    torch.testing.assert_close(model(input_ids=ids).logits,
                               result.model.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_a_planned_run_reports_the_plans_that_ran_not_one_cut_or_rank(tmp_path, tiny_llama_dir):
    from tests.transport.test_hetero_net import hetero_config

    cfg = hetero_config(tiny_llama_dir, tmp_path, steps=4)
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    result = CliRunner().invoke(app, ["train", "-c", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "net" / "summary.json").read_text())
    assert summary["cut"] is None and summary["rank"] is None
    plans = summary["plans"]
    assert len(plans) == cfg.train.num_clients
    # the run re-planned (no smoothing, threshold 0): the summary has the last plans, as
    # the last replan event recorded them
    records = [json.loads(line)
               for line in (tmp_path / "net" / "metrics.jsonl").read_text().splitlines()]
    replans = [r for r in records if r.get("event") == "replan"]
    assert summary["replans"] == len(replans) >= 1
    assert [p["cut"] for p in plans] == [p["cut"] for p in replans[-1]["plans"]]
    assert all(p["memory_bytes"] <= p["budget_bytes"] for p in plans)
    assert 0 < summary["server"]["memory_bytes"] <= summary["server"]["budget_bytes"]
    flat = " ".join(result.output.split())  # rich wraps long lines
    assert "plans that ran last" in flat
    for i, p in enumerate(plans):
        assert f"client {i}: cut {p['cut']}, {p['client_adapters']}" in flat
