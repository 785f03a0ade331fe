"""A user's mistake gets one message and exit code 2 from every command, before the
model loads where it can; an existing run is never silently replaced."""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml
from typer.testing import CliRunner

from hsplitlora.cli import app
from hsplitlora.config import RunConfig
from tests.conftest import E2E


def _config(tmp_path, model_dir, **sections):
    raw = {
        "model": {"name": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 40, "max_length": 160},
        "train": {"mode": "splitlora", "num_clients": 2, "cut": 1, "steps": 2,
                  "batch_size": 2, "agg_interval": 2, "lr": 0.01, "precision": "fp32"},
        "eval": {"max_examples": 0},
        "output": {"dir": str(tmp_path / "runs"), "name": "run", "sample_prompt": None},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], prog_name="hsplitlora")
    flat = re.sub(r"\s+", " ", result.output)  # rich wraps long lines
    return result, flat


def _load_model_forbidden(monkeypatch):
    """Checks that must fail before the weights load: loading them fails the test."""
    import hsplitlora.models.load as load

    def forbidden(*a, **k):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(load, "load_model", forbidden)


@pytest.mark.parametrize(("sections", "message"), [
    ({"train": {"cut": 9}}, "train.cut 9 is out of range: .* has 4 blocks, so the cut must be "
                            "in 0..4"),
    ({"train": {"cut": 2, "tail": 2}}, r"train.tail 2 with train.cut 2 leaves the server no "
                                       r"block: .* lower train.tail or train.cut so that "
                                       r"cut \+ tail < 4"),
    ({"train": {"mode": "federated", "tail": 1}}, "train.tail 1 needs a main server between "
                                                  "the client's cut and its tail: mode "
                                                  "'federated' has none"),
    ({"train": {"mode": "hetlora", "tail": 1}, "hetero": {"federated": True}},
     "train.tail 1 needs a main server .* mode 'hetlora' with hetero.federated runs the whole "
     "model on each client"),
    ({"train": {"mode": "hsplitlora", "tail": 3}}, "train.tail 3 leaves no cut to plan: .* has "
                                                   "4 blocks.* lower train.tail below 3"),
    ({"train": {"mode": "hsplitlora", "tail": 1}, "hetero": {"cuts": [1, 3]}},
     r"hetero.cuts \[3\] are out of range: .* has 4 blocks and a tail of 1, so a planned cut "
     r"is in 1..2"),
    ({"lora": {"targets": ["q_proj", "qkv"]}}, r"unknown LoRA target\(s\) \['qkv'\] in "
                                               "lora.targets"),
    ({"train": {"device": "cuda"}}, "no CUDA device is visible here: set train.device"),
    ({"train": {"num_clients": 50}, "data": {"max_train_examples": 10}},
     r"cannot give each of 50 clients a shard.* \(train.num_clients\)"),
    ({"data": {"partition": "dirichlet", "label_key": "cuisine"}},
     "no example has the field 'cuisine'.* set data.label_key to one of"),
    ({"output": {"report_to": ["tensorboard", "nope"]}}, "output.report_to"),
    ({"eval": {"every": 1, "max_examples": 4}}, "eval.every .* names no held-out data"),
])
def test_train_reports_mistakes_in_one_message_before_loading_the_model(
        tmp_path, tiny_llama_dir, monkeypatch, sections, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _load_model_forbidden(monkeypatch)
    result, out = _run("train", "-c", _config(tmp_path, tiny_llama_dir, **sections),
                       "--no-progress")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and out.count("error:") == 1
    assert re.search(message, out), out
    assert not (tmp_path / "runs" / "run").exists()  # nothing written


def test_unknown_model_and_malformed_data_are_one_message_with_exit_2(tmp_path, tiny_llama_dir):
    result, out = _run("train", "-c", _config(tmp_path, tmp_path / "no-such-model"))
    assert result.exit_code == 2 and "No such model directory" in out
    assert "Traceback" not in result.output
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion"\n')
    result, out = _run("train", "-c", _config(tmp_path, tiny_llama_dir, data={
        "dataset": "jsonl", "train_files": [str(data)], "max_train_examples": None}))
    assert result.exit_code == 2 and f"{data}:2: invalid JSON" in out
    assert "Traceback" not in result.output


def test_a_set_typo_is_blamed_on_the_override_not_the_file(tmp_path, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir)
    result, out = _run("train", "-c", cfg, "--set", "train.stpes=3")
    assert result.exit_code == 2
    assert "invalid --set override" in out and "did you mean 'steps'" in out
    assert "[from --set train.stpes=3]" in out and str(cfg) not in out


def test_an_existing_run_is_refused_without_resume_or_overwrite(tmp_path, tiny_llama_dir):
    cfg = _config(tmp_path, tiny_llama_dir)
    first, _ = _run("train", "-c", cfg, "--no-progress")
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "run"
    metrics = (run / "metrics.jsonl").read_bytes()
    summary = json.loads((run / "summary.json").read_text())
    result, out = _run("train", "-c", cfg, "--no-progress")
    assert result.exit_code == 2 and "already holds a run" in out and "--overwrite" in out
    assert (run / "metrics.jsonl").read_bytes() == metrics  # nothing lost
    result, _ = _run("train", "-c", cfg, "--no-progress", "--overwrite", "--set",
                     "train.steps=1")
    assert result.exit_code == 0, result.output
    again = json.loads((run / "summary.json").read_text())
    assert again["steps"] == 2 < summary["steps"] == 4  # replaced, by the new run


def test_version_completion_and_config_reference(monkeypatch):
    result, out = _run("--version")
    assert result.exit_code == 0 and out.startswith("hsplitlora ")
    # typer detects the user's shell from the parent processes (shellingham), which a
    # test runner's may not reveal: stand in a bash parent
    import shellingham
    monkeypatch.setattr(shellingham, "detect_shell", lambda: ("bash", "/bin/bash"))
    result, out = _run("--show-completion")
    assert result.exit_code == 0
    assert "complete -o default -F _hsplitlora_completion hsplitlora" in out
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 0
    schema = RunConfig.model_json_schema()

    field_texts = {d for name, props in schema["$defs"].items()
                   for p in props.get("properties", {}).values()
                   for d in [p.get("description")] if d}
    assert field_texts, "the schema carries field descriptions"
    for text in field_texts:
        assert text in result.output, text
    assert "train.steps: int = 100\n    local steps per client" in result.output
    assert "data.format: 'auto' | 'prompt_completion' | 'messages' | 'alpaca'" in result.output
    result, out = _run("config", "nosuch")
    assert result.exit_code == 2 and "sections: model, lora" in out


def test_plan_estimates_without_probing_and_errors_exit_2(tmp_path, tiny_llama_dir,
                                                          monkeypatch):
    import hsplitlora.plan as plan_module

    def no_probe(*a, **k):
        raise AssertionError("plan probed importance without --probe")

    monkeypatch.setattr(plan_module, "probe_importance", no_probe)
    cfg = _config(tmp_path, tiny_llama_dir, train={"mode": "hsplitlora", "num_clients": 2},
                  hetero={"cuts": [1, 2, 3]})
    start = time.perf_counter()
    result, out = _run("plan", "-c", cfg)
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - start < 30 and "--probe" in out
    result, out = _run("plan", "-c", cfg, "--set", "hetero.cuts=[1, 7]")
    assert result.exit_code == 2 and "hetero.cuts [7] are out of range" in out


def test_evaluate_and_export_errors_exit_2(tmp_path):
    result, out = _run("evaluate", tmp_path / "nope")
    assert result.exit_code == 2 and "does not exist" in out
    result, out = _run("export", tmp_path)
    assert result.exit_code == 2 and "nothing to export" in out
    result, out = _run("export", tmp_path, "--merged", tmp_path / "out")
    assert result.exit_code == 2 and "holds no adapter" in out


def test_serve_refuses_modes_without_a_main_server_and_existing_runs(tmp_path, tiny_llama_dir,
                                                                     monkeypatch):
    _load_model_forbidden(monkeypatch)
    cfg = _config(tmp_path, tiny_llama_dir, train={"mode": "federated"})
    result, out = _run("serve", "-c", cfg)
    assert result.exit_code == 2 and "'federated' cannot run over the network" in out
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    result, out = _run("serve", "-c", cfg, "--set", "train.mode=splitlora")
    assert result.exit_code == 2 and "already holds a run (metrics.jsonl)" in out
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
