"""A run of any homogeneous mode stopped after a checkpoint and resumed ends exactly where
the uninterrupted run does: same per-step losses and LRs, same events, same adapter.

LoRA dropout is on, so a role restored with the wrong RNG, optimizer moments, LR-schedule
position or batch-stream position shows up as different losses.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from typer.testing import CliRunner

from hsplitlora import checkpoint as ckpt
from hsplitlora.cli import app
from hsplitlora.config import ConfigError, RunConfig
from hsplitlora.train import run as run_module
from hsplitlora.train.run import train
from tests.conftest import E2E, REPO, tiny_model


def _cfg(tmp_path, mode: str, availability: float | None = None, **train_kw) -> RunConfig:
    scenario = {} if availability is None else {"scenario": {"availability": availability}}
    return RunConfig.model_validate({
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 40, "max_length": 96},
        "train": {"mode": mode, "num_clients": 2, "cut": 2, "steps": 4, "batch_size": 2,
                  "agg_interval": 2, "lr": 0.01, "warmup_steps": 1, "precision": "fp32",
                  **train_kw},
        "hetero": scenario,
        "eval": {"max_examples": 0},
        "output": {"dir": str(tmp_path), "name": "run", "sample_prompt": None},
    })


class _Killed(Exception):
    pass


def steps_of(records):
    return [(r["round"], r["client"], r["loss"], r["tokens"], r["lr"]) for r in records
            if "event" not in r]


def events_of(records):
    return [(r["event"], r["round"]) for r in records if "event" in r]


def killed_after_checkpoint(monkeypatch, stop: int, run: Callable[[], object]) -> list[int]:
    """Call ``run`` (a training run with checkpoints) and kill it right after the
    checkpoint of round ``stop`` is written; returns the rounds that were saved."""
    save = ckpt.atomic_save
    saved: list[int] = []

    def save_then_die(obj, path):
        save(obj, path)
        saved.append(obj["round"])
        if obj["round"] == stop:
            raise _Killed

    monkeypatch.setattr(run_module, "atomic_save", save_then_die)
    with pytest.raises(_Killed):
        run()
    monkeypatch.undo()
    return saved


def _run(cfg, tok, **kw):
    return train(cfg, model=tiny_model("llama"), tokenizer=tok, show_progress=False, **kw)


# With availability 0.5 and seed 3, both clients train in round 0 and only client 1 in
# round 1: the aggregation that ends round 1 must still count client 0, which a resumed
# run knows only from the checkpoint.
PARTIAL = {"availability": 0.5, "seed": 3}


@pytest.mark.parametrize("mode,stop,kw", [
    ("splitlora", 0, {}),       # mid-interval: both clients trained, not yet averaged
    ("splitlora", 1, {}),       # right after an aggregation
    ("splitlora", 0, PARTIAL),
    ("splitfed", 0, {**PARTIAL, "tail": 1}),  # U-shaped: the tails' state comes back too
    ("federated", 2, PARTIAL),
    ("split", 1, {}),           # after the first relay back to client 0
    ("centralized", 3, {}),     # checkpoints every num_clients steps: rounds 1, 3, 5, 7
])
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path, tiny_tokenizer,
                                                              monkeypatch, mode, stop, kw):
    whole = _run(_cfg(tmp_path / "whole", mode, **kw), tiny_tokenizer)

    cfg = _cfg(tmp_path / "cut", mode, **kw)
    saved_rounds = killed_after_checkpoint(
        monkeypatch, stop, lambda: _run(cfg, tiny_tokenizer, checkpoint=True))
    if mode == "centralized":
        assert saved_rounds == [1, 3]
    run_dir = tmp_path / "cut" / "run"
    assert ckpt.load_checkpoint(run_dir / "checkpoint" / "server.pt")["round"] == stop

    resumed = _run(cfg, tiny_tokenizer, checkpoint=True, resume=True)
    assert len(steps_of(resumed.records)) == len(steps_of(whole.records)) > 0
    assert steps_of(resumed.records) == steps_of(whole.records)
    assert events_of(resumed.records) == events_of(whole.records)
    assert resumed.adapter.keys() == whole.adapter.keys()
    for name, value in whole.adapter.items():
        assert torch.equal(resumed.adapter[name], value), name
    # the metrics file holds each step once
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert sum('"loss"' in line and '"event"' not in line for line in lines) == len(
        steps_of(whole.records))


def test_resuming_with_a_changed_config_is_refused(tmp_path, tiny_tokenizer):
    _run(_cfg(tmp_path, "splitlora", steps=2), tiny_tokenizer, checkpoint=True)
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.01 -> 0\.02"):
        _run(_cfg(tmp_path, "splitlora", steps=2, lr=0.02), tiny_tokenizer, resume=True)


def test_cli_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["train", "-c", str(REPO / "configs" / "tiny.yaml"),
                                      "--resume", "--set", f"output.dir={tmp_path}",
                                      "--no-progress"])
    assert result.exit_code == 2
    assert "no checkpoint at" in " ".join(result.output.split())


def test_cli_checkpoint_then_resume_keeps_every_step_once(tmp_path, tiny_llama_dir):
    """``--checkpoint`` writes the checkpoint; ``--resume`` after the last round trains
    nothing more, keeps the metrics and writes the same summary (a kill between the last
    round and the end of the run loses nothing)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{name: {tiny_llama_dir}}}
lora: {{r: 4, alpha: 8, dropout: 0.1}}
data: {{train_files: [{E2E / 'original' / 'devset.csv'}], max_train_examples: 40,
        max_length: 96}}
train: {{mode: splitlora, num_clients: 2, cut: 1, steps: 3, batch_size: 2, agg_interval: 2,
        precision: fp32}}
eval: {{max_examples: 0}}
output: {{dir: {tmp_path / 'runs'}, name: tiny, sample_prompt: null}}
""")
    run = tmp_path / "runs" / "tiny"
    first = CliRunner().invoke(app, ["train", "-c", str(cfg), "--checkpoint", "--no-progress"])
    assert first.exit_code == 0, first.output
    assert ckpt.load_checkpoint(run / "checkpoint" / "server.pt")["round"] == 2
    summary = (run / "summary.json").read_text(encoding="utf-8")
    again = CliRunner().invoke(app, ["train", "-c", str(cfg), "--resume", "--no-progress"])
    assert again.exit_code == 0, again.output
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert sum('"event"' not in line for line in lines) == 6
    for key in ("final_loss", "first_loss", "steps", "bytes_up"):
        assert json.loads(summary)[key] == json.loads(
            (run / "summary.json").read_text(encoding="utf-8"))[key], key


def test_a_serve_checkpoint_is_not_resumed_in_process(tmp_path, tiny_tokenizer):
    """`hsplitlora serve` (homogeneous modes) checkpoints only the server side; its
    clients keep their own state. Resuming that in process would lose the clients'."""
    cfg = _cfg(tmp_path, "splitlora", steps=2)
    path = tmp_path / "run" / "checkpoint" / "server.pt"
    path.parent.mkdir(parents=True)
    ckpt.atomic_save({"round": 0, "config": cfg.model_dump(mode="json"), "server": {},
                      "fed": None}, path)
    with pytest.raises(ConfigError, match="serve --resume"):
        _run(cfg, tiny_tokenizer, resume=True)
