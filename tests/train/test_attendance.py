"""Client availability: each round's attendance, and training over whoever is present."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.config import RunConfig
from hsplitlora.train import engine
from hsplitlora.train.attendance import present
from hsplitlora.train.parties import client_recipes, fed_server, server_recipe
from hsplitlora.train.recorder import Recorder
from hsplitlora.train.run import prepare, train
from tests.conftest import E2E, tiny_model


def test_attendance_is_seeded_per_round_and_follows_availability():
    assert present([1.0, 1.0, 1.0], seed=0, round=5) == [0, 1, 2]
    draws = [present([0.5, 0.9, 1.0], seed=7, round=r) for r in range(4000)]
    assert draws == [present([0.5, 0.9, 1.0], seed=7, round=r) for r in range(4000)]
    assert draws != [present([0.5, 0.9, 1.0], seed=8, round=r) for r in range(4000)]
    rate = [sum(cid in d for d in draws) / len(draws) for cid in range(3)]
    assert abs(rate[0] - 0.5) < 0.03 and abs(rate[1] - 0.9) < 0.02 and rate[2] == 1.0


def _cfg(mode: str, availability: float | None = None, **hetero) -> RunConfig:
    scenario = {"availability": availability} if availability else {}
    return RunConfig.model_validate({
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 60, "max_length": 160},
        "train": {"mode": mode, "num_clients": 3, "cut": 2, "steps": 6, "batch_size": 2,
                  "agg_interval": 2, "lr": 5e-3, "precision": "fp32", "seed": 3},
        "hetero": {"scenario": {**scenario, **hetero.pop("scenario", {})}, **hetero},
        "eval": {"max_examples": 0},
        "output": {"sample_prompt": None},
    })


def test_an_absent_client_is_left_out_of_steps_and_averages(tiny_tokenizer):
    """SplitLoRA where client 1 never shows up ends exactly where a run of clients 0 and 2
    alone does (FedAvg weights renormalised over them), and client 1 still receives every
    aggregate."""
    cfg = _cfg("splitlora")

    def parties():
        p = prepare(cfg, tiny_model("llama"), tiny_tokenizer)
        return [r.build(p.device) for r in client_recipes(p)], server_recipe(p).build(p.device), p

    clients, server, p = parties()
    rec = Recorder(None, 6, show_progress=False)
    absent = engine.run_splitlora(clients, server, fed_server(p), 6, 2, rec,
                                 attendance=lambda t: {0, 2})
    alone_clients, alone_server, q = parties()
    alone = engine.run_splitlora([alone_clients[0], alone_clients[2]], alone_server,
                                fed_server(q), 6, 2, Recorder(None, 6, show_progress=False))
    for k, v in alone.items():
        assert torch.equal(absent[k], v), k
    assert {r["client"] for r in rec.records if "event" not in r} == {0, 2}
    assert [r["clients"] for r in rec.records if r.get("event") == "aggregate"] == [[0, 2]] * 3
    for k, v in clients[1].adapter_state().items():
        assert torch.equal(v, absent[k]), k


@pytest.mark.parametrize("mode", ["federated", "splitfed", "hsplitlora"])
def test_rounds_train_the_clients_drawn_and_aggregate_those_that_trained(tiny_tokenizer,
                                                                          mode):
    hetero = {"scenario": {"kind": "heterogeneous", "memory_range": ["1.2 MiB", "3 MiB"]},
              "rank_set": [0, 2, 4], "server_rank": 4, "probe_batches": 1} \
        if mode == "hsplitlora" else {}
    cfg = _cfg(mode, availability=0.5, **hetero)
    result = train(cfg, model=tiny_model("llama"), tokenizer=tiny_tokenizer, write=False,
                   show_progress=False)
    steps = [r for r in result.records if "event" not in r]
    drawn = {t: present([0.5] * 3, 3, t) for t in range(6)}
    assert sorted((r["round"], r["client"]) for r in steps) == \
        sorted((t, c) for t, ids in drawn.items() for c in ids)
    assert 0 < len(steps) < 18  # some rounds really missed someone
    aggs = [r for r in result.records if r.get("event") == "aggregate" and "clients" in r]
    for agg in aggs:
        end = agg["round"]
        window = {c for t in range(end - 1, end + 1) for c in drawn[t]}
        assert agg["clients"] == sorted(window)
    assert all(torch.isfinite(v).all() for v in result.adapter.values())


def test_availability_is_validated():
    with pytest.raises(Exception, match="availability"):
        _cfg("splitlora", availability=1.5)


def test_a_run_nobody_attends_is_refused_before_training(tmp_path, tiny_llama_dir):
    from typer.testing import CliRunner

    from hsplitlora.cli import app
    from hsplitlora.config import ConfigError

    cfg = _cfg("splitlora", availability=0.001)
    raw = cfg.model_dump(mode="json")
    raw["model"]["name"] = str(tiny_llama_dir)
    raw["output"] = {"dir": str(tmp_path), "name": "nobody", "sample_prompt": None}
    with pytest.raises(ConfigError, match="no client takes part in any of the 6 rounds"):
        train(RunConfig.model_validate(raw), write=False, show_progress=False)
    path = tmp_path / "run.yaml"
    path.write_text(RunConfig.model_validate(raw).to_yaml())
    out = CliRunner().invoke(app, ["train", "-c", str(path), "--no-progress"])
    assert out.exit_code == 2
    assert "raise hetero.scenario.availability" in out.output
    assert not (tmp_path / "nobody").exists()  # refused before a run folder was made
