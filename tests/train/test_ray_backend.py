"""The Ray backend against the in-process simulation: same roles, same numbers.

One local Ray session serves the module (starting it costs seconds). With fp32, one torch
thread per party and no dropout, every mode must end bit-identical to the in-process run,
and record the same losses and byte counts step by step.
"""

from __future__ import annotations

import pytest
import torch

from hsplitlora.train.run import train
from tests.transport.conftest import run_config

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=5, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _steps(records):
    return [(r["round"], r["client"], r["loss"], r["tokens"], r["bytes_up"], r["bytes_down"],
             r["lr"]) for r in records if "event" not in r]


# Starting a run's actors costs ~15 s here, so three modes stand for five: the client and
# server proxies with one shared and with per-client server adapters, and the learner proxy
# (split and centralized call nothing these do not). The per-client one is U-shaped (tail
# 1: the client's tail and the server's two hops); the shared one is not.
@pytest.mark.parametrize(("mode", "tail"), [("splitlora", 0), ("splitfed", 1), ("federated", 0)])
def test_ray_run_is_bit_identical_to_the_in_process_run(ray_session, tmp_path, tiny_llama_dir,
                                                        mode, tail):
    cfg = run_config(tiny_llama_dir, tmp_path, mode=mode, steps=3, cut=1 if tail else 2,
                     tail=tail)
    local = train(cfg, write=False, show_progress=False)
    remote = train(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"backend": "ray"})}), write=False, show_progress=False)
    assert set(remote.adapter) == set(local.adapter)
    for k, v in local.adapter.items():
        assert torch.equal(remote.adapter[k], v), k
    assert _steps(remote.records) == _steps(local.records)
    assert [r["event"] for r in remote.records if "event" in r] == \
        [r["event"] for r in local.records if "event" in r]
    # The run trained: adapters moved from their initialisation.
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in local.adapter.items())


class _Broken:
    """A recipe whose role cannot be built: its actor fails on start."""

    client_id, num_samples, per_client, tail = 0, 1, False, None

    def build(self, device):
        raise ValueError("this shard is unreadable")


def test_a_failing_actor_reports_its_own_error(ray_session):
    from ray import cloudpickle

    from hsplitlora.train.config import RayConfig
    from hsplitlora.train.ray_backend import RayPlacement

    cloudpickle.register_pickle_by_value(__import__(__name__))
    place = RayPlacement(RayConfig(), threads=1, num_actors=1)
    place.place(_Broken(), "server")
    with pytest.raises(Exception, match="this shard is unreadable"):
        place.started()
    place.close(check=False)
    assert place.actors == []


def test_actors_the_cluster_cannot_place_time_out_with_what_they_asked(ray_session):
    from hsplitlora.train.config import RayConfig
    from hsplitlora.train.ray_backend import RayPlacement

    place = RayPlacement(RayConfig(client_gpus=1, start_timeout_s=3), threads=1, num_actors=1)
    place.place(_Broken(), "client")
    with pytest.raises(RuntimeError, match=r"1.0 GPU per client.*0 GPU free.*ray.client_cpus"):
        place.started()
    place.close(check=False)


def test_the_cli_takes_the_backend_and_rejects_an_unknown_one(tmp_path, tiny_llama_dir):
    from typer.testing import CliRunner

    from hsplitlora.cli import app

    cfg = run_config(tiny_llama_dir, tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    out = CliRunner().invoke(app, ["train", "-c", str(path), "--backend", "spark"])
    assert out.exit_code == 2
    assert "train.backend" in out.output and "'inprocess' or 'ray'" in out.output


@pytest.mark.parametrize("aggregator,server_side,tail", [("noisefree", None, 0),  # shared
                                                         ("svd", "per_participant", 1)])
def test_heterogeneous_ray_run_is_bit_identical_too(ray_session, tmp_path, tiny_llama_dir,
                                                    aggregator, server_side, tail):
    """HSplitLoRA (importance probing, per-client cuts and ranks, noise-free merging) and
    FlexLoRA-style SVD aggregation, with every client and the server in its own actor; a
    shared server side's views reach the server's actor as views of one segment. The SVD
    case is U-shaped: each client's actor holds its tail, probes and trains it."""
    from hsplitlora.config import RunConfig

    cfg = run_config(tiny_llama_dir, tmp_path, mode="hsplitlora", steps=4, tail=tail)
    raw = cfg.model_dump(mode="json")
    raw["hetero"] = {"scenario": {"kind": "heterogeneous", "memory_range": ["1.2 MiB", "3 MiB"],
                                  "seed": 1},
                     "aggregator": aggregator, "rank_set": [0, 2, 4, 8], "server_rank": 4,
                     "probe_batches": 1,
                     # a deadline no plan reaches: memory alone decides, so the budgets
                     # put the clients at different cuts and the actors hold different plans
                     "round_time_s": 1e9, "server_side": server_side}
    cfg = RunConfig.model_validate(raw)
    local = train(cfg, write=False, show_progress=False)
    raw["train"]["backend"] = "ray"
    remote = train(RunConfig.model_validate(raw), write=False, show_progress=False)
    plans = [r["plans"] for r in local.records if r.get("event") == "plan"]
    assert plans == [r["plans"] for r in remote.records if r.get("event") == "plan"]
    assert len({(p["cut"], tuple(p["ranks"].values())) for p in plans[0]}) > 1  # they differ
    assert set(remote.adapter) == set(local.adapter)
    for k, v in local.adapter.items():
        assert torch.equal(remote.adapter[k], v), k
    assert _steps(remote.records) == _steps(local.records)
