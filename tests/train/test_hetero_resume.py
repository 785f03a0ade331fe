"""A heterogeneous run stopped after any round and resumed from its checkpoint ends
exactly where the uninterrupted run does: same plans, same per-step losses, same adapter.

The checkpoint must carry everything that moves: merged base weights (as the log of
merges), plans and restarts, importance history, every server-side copy and client with
its optimizer, LR schedule, batch-stream position and RNG (dropout is on, so a wrong RNG
shows up as different losses).
"""

from __future__ import annotations

import json

import pytest
import torch

from hsplitlora import checkpoint as ckpt
from hsplitlora.config import ConfigError, RunConfig
from hsplitlora.train.run import train
from tests.conftest import E2E, tiny_model
from tests.train.test_resume import events_of, killed_after_checkpoint, steps_of

SCENARIO = {"kind": "heterogeneous", "memory_range": ["1.2 MiB", "3 MiB"], "seed": 1}


def _cfg(tmp_path, mode: str, aggregator: str, server_side: str | None = None,
         **train_kw) -> RunConfig:
    return RunConfig.model_validate({
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 60, "max_length": 160},
        "train": {"mode": mode, "num_clients": 3, "cut": 2, "steps": 6, "batch_size": 2,
                  "agg_interval": 2, "lr": 0.01, "warmup_steps": 1, "precision": "fp32",
                  **train_kw},
        "hetero": {"scenario": SCENARIO, "aggregator": aggregator, "rank_set": [0, 2, 4, 8],
                   "server_rank": 4, "probe_batches": 1, "replan_threshold": 0.0,
                   "prune_gamma": 0.5, "prune_threshold": 0.9,  # hetlora prunes often
                   "server_side": server_side,
                   # shared: a deadline no plan reaches, so memory alone decides and the
                   # clients sit at different cuts (views of one server side)
                   **({"round_time_s": 1e9} if server_side == "shared" else {})},
        "eval": {"max_examples": 0},
        "output": {"dir": str(tmp_path), "name": "run", "sample_prompt": None},
    })


@pytest.mark.parametrize("mode,aggregator,stop,server_side,tail", [
    ("hsplitlora", "noisefree", 2, "per_participant", 0),  # mid-interval: merges, re-plans to come
    ("hsplitlora", "noisefree", 3, None, 0),  # right after a merge and re-plan
    # one server adapter, its views rebuilt; U-shaped: each client's tail comes back too
    ("hsplitlora", "noisefree", 2, "shared", 1),
    ("flexlora", "svd", 2, None, 0),
    ("hetlora", "zeropad", 2, None, 0),  # its global adapter and pruned ranks are checkpointed
])
def test_a_resumed_heterogeneous_run_ends_where_the_uninterrupted_one_does(
        tmp_path, tiny_tokenizer, monkeypatch, mode, aggregator, stop, server_side, tail):
    whole = train(_cfg(tmp_path / "whole", mode, aggregator, server_side, tail=tail),
                  model=tiny_model("llama"), tokenizer=tiny_tokenizer, show_progress=False)

    cfg = _cfg(tmp_path / "cut", mode, aggregator, server_side, tail=tail)
    killed_after_checkpoint(monkeypatch, stop, lambda: train(
        cfg, model=tiny_model("llama"), tokenizer=tiny_tokenizer, show_progress=False,
        checkpoint=True))
    run_dir = tmp_path / "cut" / "run"
    assert ckpt.load_checkpoint(run_dir / "checkpoint" / "server.pt")["round"] == stop

    resumed = train(cfg, model=tiny_model("llama"), tokenizer=tiny_tokenizer,
                    show_progress=False, checkpoint=True, resume=True)
    assert steps_of(resumed.records) == steps_of(whole.records)
    assert events_of(resumed.records) == events_of(whole.records)
    if mode == "hsplitlora" and stop == 2:
        # a merge and a re-plan happened after resuming
        assert ("replan", 3) in events_of(resumed.records)
    if server_side == "shared":  # the views really start at different cuts
        plans = next(r["plans"] for r in whole.records if r.get("event") == "plan")
        assert len({p["cut"] for p in plans}) > 1, plans
    if mode == "hetlora":  # self-pruning lowered ranks before and after the checkpoint
        rounds = [r["round"] for r in whole.records if r.get("event") == "replan"]
        assert min(rounds) <= stop < max(rounds), rounds
    assert resumed.adapter.keys() == whole.adapter.keys() and resumed.adapter
    for k, v in whole.adapter.items():
        assert torch.equal(resumed.adapter[k], v), k
    # the metrics file holds each step once: the rounds after the checkpoint were dropped
    # and written again, the ones before kept
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_of(lines) == steps_of(whole.records)
    assert [r["step"] for r in lines if "step" in r] == list(range(1, 19))


def test_a_resumed_run_refuses_a_config_that_changes_what_it_computes(tmp_path,
                                                                     tiny_tokenizer):
    cfg = _cfg(tmp_path, "flexlora", "svd", steps=2)
    train(cfg, model=tiny_model("llama"), tokenizer=tiny_tokenizer, show_progress=False,
          checkpoint=True)
    raw = cfg.model_dump(mode="json")
    raw["train"].update(steps=4, lr=0.02, threads=1)  # threads may change, the rest not
    changed = RunConfig.model_validate(raw)
    with pytest.raises(ConfigError, match=r"train.lr: 0.01 -> 0.02; train.steps: 2 -> 4"):
        train(changed, model=tiny_model("llama"), tokenizer=tiny_tokenizer,
              show_progress=False, resume=True)


def test_checkpointing_needs_a_run_folder(tmp_path):
    cfg = _cfg(tmp_path, "hsplitlora", "noisefree")
    with pytest.raises(ValueError, match="needs a run folder"):
        train(cfg, checkpoint=True, write=False)
