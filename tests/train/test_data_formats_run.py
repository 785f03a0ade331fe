"""A run on a Hugging Face chat dataset, end to end: rendered with the chat template,
held-out split evaluated, the sample prompt taken from the data."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from hsplitlora.cli import app

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_train_and_evaluate_on_a_local_chat_dataset(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = CHATML
    tok.save_pretrained(tiny_llama_dir)
    rows = [{"messages": [{"role": "user", "content": f"Describe pub {i}."},
                          {"role": "assistant", "content": f"Pub {i} is by the river."}],
             "area": "riverside" if i % 2 else "city centre"} for i in range(20)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"dataset": "hf", "source": str(data), "split": "train[:16]",
                 "eval_split": "train[16:]", "max_length": 64, "partition": "dirichlet",
                 "label_key": "area"},
        "train": {"mode": "splitlora", "num_clients": 2, "cut": 1, "steps": 2, "batch_size": 2,
                  "agg_interval": 1, "lr": 0.01, "precision": "fp32"},
        "eval": {"max_examples": 4, "num_beams": 1},
        "output": {"dir": str(tmp_path / "runs"), "name": "chat"},
    }))
    result = CliRunner().invoke(app, ["train", "-c", str(cfg), "--no-progress"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "chat"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_ppl"] > 1 and sum(summary["shard_sizes"]) == 16
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["eval_file"] is None and saved["output"]["sample_prompt"] == "auto"
    assert "before" in summary["samples"]  # the held-out chat's rendered prompt was sampled

    result = CliRunner().invoke(app, ["evaluate", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    scores = json.loads((run / "scores.json").read_text())
    assert scores["num_mrs"] == 4 and scores["eval_examples"] == 4
    assert (run / "references.txt").read_text().startswith("Pub 16 is by the river.")
