"""output.report_to: TensorBoard, W&B (offline) and MLflow (local file store) get the
recorder's figures, with no network."""

from __future__ import annotations

import json

import pytest

from hsplitlora.config import ConfigError, RunConfig
from hsplitlora.train.run import train
from tests.conftest import E2E, tiny_model


def _cfg(tmp_path, report_to):
    return RunConfig.model_validate({
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")],
                 "eval_file": str(E2E / "original" / "testset_w_refs.csv"),
                 "max_train_examples": 40, "max_length": 160},
        "train": {"mode": "splitlora", "num_clients": 2, "cut": 2, "steps": 4, "batch_size": 2,
                  "agg_interval": 2, "lr": 0.01, "precision": "fp32"},
        "eval": {"max_examples": 4, "every": 1},
        "output": {"dir": str(tmp_path), "name": "run", "sample_prompt": None,
                   "report_to": report_to, "wandb_mode": "offline", "project": "test"},
    })


def test_every_tracker_gets_the_steps_events_clock_and_summary(tmp_path, tiny_tokenizer,
                                                               monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train(_cfg(tmp_path, ["tensorboard", "wandb", "mlflow"]), model=tiny_model("gpt2"),
                   tokenizer=tiny_tokenizer, show_progress=False)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "event" not in r]
    assert len(losses) == 8
    evals = [r for r in records if r.get("event") == "eval"]
    aggregates = [r for r in records if r.get("event") == "aggregate"]
    assert len(evals) == 2 and aggregates

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    tags = tb.Tags()["scalars"]
    assert [e.value for e in tb.Scalars("train/loss")] == pytest.approx(losses)
    assert [e.step for e in tb.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in tb.Scalars("eval/ppl")] == pytest.approx([r["ppl"] for r in evals])
    assert {"train/bytes_up", "train/lr", "aggregate/bytes_up", "sim/seconds",
            "summary/final_loss"} <= set(tags)
    assert [e.value for e in tb.Scalars("sim/seconds")] == pytest.approx(
        result.summary["simulated_round_s"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (mlrun,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    history = client.get_metric_history(mlrun.info.run_id, "train/loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(losses)
    assert mlrun.data.params["train.mode"] == "splitlora"
    assert mlrun.data.metrics["summary/eval_ppl"] == pytest.approx(result.summary["eval_ppl"])

    (offline,) = (run / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    data = log.read_bytes()
    for key in (b"train/loss", b"eval/ppl", b"aggregate/bytes_up", b"sim/seconds",
                b"final_loss"):
        assert key in data, key


def test_a_tracker_without_its_package_is_refused_with_the_install_line(tmp_path, monkeypatch):
    import importlib.util

    from hsplitlora.train.preflight import preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"wandb package is not installed: pip install "
                                          r"'hsplitlora\[wandb\]'"):
        preflight(_cfg(tmp_path, ["wandb"]), tiny_model("gpt2").config)
