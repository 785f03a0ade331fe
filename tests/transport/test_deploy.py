"""Whole deployments on loopback, one process per party, against in-process simulations.

With a fixed seed, fp32 and the exact wire format, the networked run must end with the
very same adapters (bit for bit) as ``hsplitlora.train.run.train``; a killed client and a
killed-and-resumed server must end exactly where the matching in-process schedule does.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from hsplitlora.checkpoint import load_checkpoint
from hsplitlora.roles.fedserver import FedServer
from hsplitlora.train import engine
from hsplitlora.train.parties import client_recipes
from hsplitlora.train.recorder import Recorder
from hsplitlora.train.run import prepare, train
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.parties import build_client, build_server
from hsplitlora.transport.wire import read_header
from tests.transport import harness
from tests.transport.conftest import peft_adapter, run_config


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got and set(got) <= set(want)
    for k, v in got.items():
        assert torch.equal(v, want[k]), f"{k}: max diff {(v - want[k]).abs().max():.3g}"


def _assert_records_are_what_the_wire_carried(records, tmp_path):
    """Per client: the steps' recorded bytes are the whole activation and gradient blobs
    its link carried (a U-shaped step's two each way); each aggregation's ``links`` are the
    adapter tensors it uploaded to the fed server and the aggregate's it got back (headers
    aside)."""
    aggs = [r for r in records if r.get("event") == "aggregate" and r["side"] == "client"]
    assert aggs
    for cid in range(3):
        wire = harness.wire_log(tmp_path, cid)
        steps = [r for r in records if "event" not in r and r["client"] == cid]
        assert sum(s["bytes_up"] for s in steps) == sum(
            e["bytes"] for e in wire if e["kind"] in ("acts", "tailgrad"))
        assert sum(s["bytes_down"] for s in steps) == sum(
            e["bytes"] for e in wire if e["kind"] in ("grad", "mid"))
        links = [link for r in aggs for link in r["links"] if link[0] == cid]
        assert len(links) == len(aggs)
        for direction, kind, column in (("up", "adapter", 1), ("down", "aggregate", 2)):
            blobs = [e["payload"] for e in wire if (e["dir"], e["kind"]) == (direction, kind)]
            assert [link[column] for link in links] == blobs and all(blobs)


def _label_bytes(cfg, rounds: int) -> list[bytes]:
    """Every row of labels the clients train on in ``rounds`` rounds, as int32 and int64
    bytes (the exact codec sends labels as int32)."""
    p = prepare(cfg)
    rows = []
    for recipe in client_recipes(p):
        stream = recipe.stream()
        for _ in range(rounds):
            for row in next(stream)["labels"]:
                rows += [row.to(dtype).numpy().tobytes() for dtype in (torch.int32, torch.int64)]
    return rows


# The per-client server side is U-shaped (tail 1): every blob its clients' links carry is
# kept and must hold no label, where the shared one's (tail 0) hold every label row.
@pytest.mark.parametrize(("mode", "tail"), [("splitlora", 0), ("splitfed", 1)])
def test_networked_run_is_bit_identical_to_the_in_process_simulation(tmp_path, tiny_llama_dir,
                                                                      mode, tail):
    cfg = run_config(tiny_llama_dir, tmp_path, mode=mode, cut=1 if tail else 2, tail=tail)
    local = train(cfg, write=False, show_progress=False)
    reference = local.adapter
    net = NetConfig(port=0, step_timeout_s=20, join_timeout_s=60)
    server, address = harness.serve_loopback(cfg, net, tmp_path)
    codes = harness.finish([server, *harness.start_clients(cfg, net, address, tmp_path,
                                                           wire_logs=True)], 90)
    assert codes == [0, 0, 0, 0]
    run = tmp_path / "net"
    _assert_records_are_what_the_wire_carried(harness.records(run), tmp_path)

    def links(records):
        return [r["links"] for r in records
                if r.get("event") == "aggregate" and r["side"] == "client"]

    assert links(harness.records(run)) == links(local.records)  # as the simulation says
    adapter = peft_adapter(run)
    assert set(adapter) == set(reference)
    _assert_same(adapter, reference)
    for i in range(3):  # every client ends holding the final client-side aggregate
        _assert_same(load_file(tmp_path / f"client-{i}.safetensors"), reference)
    steps = [r for r in harness.records(run) if "event" not in r]
    assert [(r["round"], r["client"]) for r in steps] == [(t, c) for t in range(4)
                                                          for c in range(3)]
    assert [r["loss"] for r in steps] == [r["loss"] for r in local.records if "event" not in r]
    blobs: dict[tuple[str, str], list[bytes]] = {}
    for cid in range(3):
        for e in harness.wire_log(tmp_path, cid):
            blobs.setdefault((e["dir"], e["kind"]), []).append(harness.wire_blob(tmp_path, e))
    labelled = [row for row in _label_bytes(cfg, 4)
                if any(row in blob for kept in blobs.values() for blob in kept)]
    uploads = blobs[("up", "acts")]
    if tail:
        assert [len(blobs[k]) for k in (("up", "acts"), ("down", "mid"), ("up", "tailgrad"),
                                        ("down", "grad"))] == [12] * 4
        assert not [b for b in uploads if "labels" in read_header(b).tensors]
        assert labelled == []  # no label row, in any width, in any message
    else:
        assert all("labels" in read_header(b).tensors for b in uploads)
        assert len(labelled) >= 12 * cfg.train.batch_size  # the check does see them
    # up: hidden states and mask (and labels, or the tail's gradient); down: the gradient
    # (and the middle's output)
    assert all(r["bytes_up"] > r["bytes_down"] > 0 for r in steps)


def test_fed_server_in_its_own_process(tmp_path, tiny_llama_dir):
    cfg = run_config(tiny_llama_dir, tmp_path)
    reference = train(cfg, write=False, show_progress=False).adapter
    fed_port = harness.free_port()
    fed_net = NetConfig(fed_port=fed_port, step_timeout_s=20)
    fed_port_file = tmp_path / "fed-port"
    fed = harness.start_fed(cfg, fed_net, port_file=fed_port_file)
    harness.wait_for(fed_port_file.exists, 60, "the fed server to listen")
    net = NetConfig(port=0, fed_address=f"127.0.0.1:{fed_port}", step_timeout_s=20,
                    join_timeout_s=60)
    server, address = harness.serve_loopback(cfg, net, tmp_path)
    codes = harness.finish([server, fed, *harness.start_clients(cfg, net, address, tmp_path)], 90)
    assert codes == [0] * 5
    server_half = load_file(tmp_path / "net" / "server_adapter.safetensors")
    client_half = load_file(tmp_path / "net-fed" / "client_adapter.safetensors")
    assert not (tmp_path / "net" / "adapter").exists()  # the main server never held both
    assert set(server_half) | set(client_half) == set(reference)
    _assert_same(server_half, reference)
    _assert_same(client_half, reference)


def test_a_client_killed_mid_round_is_dropped_and_the_others_finish(tmp_path, tiny_llama_dir):
    cfg = run_config(tiny_llama_dir, tmp_path, steps=4, agg_interval=2)
    net = NetConfig(port=0, step_timeout_s=20, join_timeout_s=60)
    server, address = harness.serve_loopback(cfg, net, tmp_path)
    # client 1 dies in round 2
    procs = harness.start_clients(cfg, net, address, tmp_path, die={1: 2})
    codes = harness.finish([server, *procs], 90)
    assert codes == [0, 0, -signal.SIGKILL, 0]
    records = harness.records(tmp_path / "net")
    steps = [(r["round"], r["client"]) for r in records if "event" not in r]
    assert steps == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 2),
                     (3, 0), (3, 2)]
    aggregations = [(r["round"], r["clients"]) for r in records if r.get("event")]
    assert aggregations == [(1, [0, 1, 2]), (3, [0, 2])]
    # The same schedule in process: all three for two rounds, then clients 0 and 2 alone,
    # FedAvg weights renormalised over the two.
    p = prepare(cfg)
    main, _ = build_server(p)
    parties = [build_client(p, i) for i in range(3)]
    clients = [party.build(p.device) for party in parties]
    fed = FedServer(weighting=cfg.train.agg_weighting, alpha=p.lora.alpha)
    rec = Recorder(None, 4, show_progress=False)
    engine.run_splitlora(clients, main, fed, 2, 2, rec)
    expected = engine.run_splitlora([clients[0], clients[2]], main, fed, 2, 2, rec)
    _assert_same(peft_adapter(tmp_path / "net"), expected)
    for i in (0, 2):
        _assert_same(load_file(tmp_path / f"client-{i}.safetensors"), expected)


def test_a_killed_server_resumes_from_its_checkpoint_to_the_same_adapters(tmp_path,
                                                                          tiny_llama_dir):
    cfg = run_config(tiny_llama_dir, tmp_path, steps=30, agg_interval=3)
    reference = train(cfg, write=False, show_progress=False).adapter
    net = NetConfig(port=harness.free_port(), step_timeout_s=20, join_timeout_s=60,
                    rejoin_backoff_s=0.1, rejoin_attempts=20)
    server, address = harness.serve_loopback(cfg, net, tmp_path)
    clients = harness.start_clients(cfg, net, address, tmp_path)
    checkpoint = tmp_path / "net" / "checkpoint" / "server.pt"

    def checkpointed(at_least: int) -> bool:
        return checkpoint.exists() and load_checkpoint(checkpoint)["round"] >= at_least

    harness.wait_for(lambda: checkpointed(4), 60, "round 4's checkpoint")
    server.kill()
    server.join(10)
    killed_at = load_checkpoint(checkpoint)["round"]
    assert server.exitcode == -signal.SIGKILL and killed_at < cfg.train.steps - 1
    resumed, _ = harness.serve_loopback(cfg, net, tmp_path, resume=True)
    codes = harness.finish([resumed, *clients], 120)
    assert codes == [0, 0, 0, 0]
    _assert_same(peft_adapter(tmp_path / "net"), reference)
    for i in range(3):
        _assert_same(load_file(tmp_path / f"client-{i}.safetensors"), reference)
    steps = [(r["round"], r["client"]) for r in harness.records(tmp_path / "net")
             if "event" not in r]
    assert steps == [(t, c) for t in range(30) for c in range(3)]  # replayed rounds once


def test_a_killed_client_restarts_from_its_checkpoint_and_rejoins(tmp_path, tiny_llama_dir):
    cfg = run_config(tiny_llama_dir, tmp_path, steps=40, agg_interval=4)
    net = NetConfig(port=0, step_timeout_s=20, join_timeout_s=60)
    server, address = harness.serve_loopback(cfg, net, tmp_path)
    checkpoint = tmp_path / "client-1.pt"
    out = tmp_path / "client-1.safetensors"
    others = [harness.start_client(cfg, net, i, address, tmp_path / f"client-{i}.safetensors")
              for i in (0, 2)]
    first = harness.start_client(cfg, net, 1, address, out, die_at=2, checkpoint=checkpoint)
    assert harness.finish([first], 60) == [-signal.SIGKILL]
    assert load_checkpoint(checkpoint)["snapshot"]["round"] == 2  # saved as round 2 began
    again = harness.start_client(cfg, net, 1, address, out, checkpoint=checkpoint, resume=True)
    codes = harness.finish([server, *others, again], 90)
    assert codes == [0, 0, 0, 0]
    rounds_of_1 = [r["round"] for r in harness.records(tmp_path / "net")
                   if "event" not in r and r["client"] == 1]
    assert rounds_of_1[:2] == [0, 1] and 2 not in rounds_of_1 and rounds_of_1[-1] == 39
    final = peft_adapter(tmp_path / "net")
    _assert_same(load_file(out), final)  # back in step: it ends with the last aggregate


def test_serve_resume_refuses_a_config_that_changed_what_the_run_computes(tmp_path,
                                                                         tiny_llama_dir):
    from hsplitlora.checkpoint import atomic_save
    from hsplitlora.config import ConfigError
    from hsplitlora.transport.deploy import run_folder, serve

    cfg = run_config(tiny_llama_dir, tmp_path, steps=4)
    saved = run_config(tiny_llama_dir, tmp_path, steps=4, lr=1e-3)
    atomic_save({"config": saved.model_dump(mode="json"), "round": 1},
                run_folder(cfg) / "checkpoint" / "server.pt")
    with pytest.raises(ConfigError, match=r"train.lr: 0.001 -> 0.005"):
        serve(cfg, NetConfig(port=0), resume=True)


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip"])
def test_serve_resume_refuses_a_damaged_checkpoint_naming_it(tmp_path, tiny_llama_dir, damage):
    from hsplitlora.checkpoint import CheckpointError, atomic_save
    from hsplitlora.transport.deploy import run_folder, serve

    cfg = run_config(tiny_llama_dir, tmp_path, steps=4)
    path = run_folder(cfg) / "checkpoint" / "server.pt"
    atomic_save({"config": cfg.model_dump(mode="json"), "round": 1,
                 "x": torch.zeros(256)}, path)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 1
    path.write_bytes(b"" if damage == "empty" else bytes(raw[: len(raw) // 2])
                     if damage == "truncate" else bytes(raw))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} (is empty|is truncated or "
                                              "corrupted)"):
        serve(cfg, NetConfig(port=0), resume=True)


def test_a_private_networked_run_is_bit_identical_and_reports_its_epsilon(tmp_path,
                                                                          tiny_llama_dir):
    """Differential privacy over gRPC: each client clips and noises its activations and
    its adapter update in its own process, with the noise streams the simulation draws,
    so the served run ends where the in-process one does, and the server's summary and
    metrics spend the same epsilon."""
    cfg = run_config(tiny_llama_dir, tmp_path, mode="splitfed", cut=1)
    cfg.privacy = cfg.privacy.model_copy(update={
        "enabled": True, "activation_clip": 0.5, "activation_noise": 0.3,
        "adapter_clip": 0.05, "adapter_noise": 0.5, "delta": 1e-3})
    cfg = type(cfg).model_validate(cfg.model_dump())
    local = train(cfg, write=False, show_progress=False)
    net = NetConfig(port=0, step_timeout_s=20, join_timeout_s=60)
    server, address = harness.serve_loopback(cfg, net, tmp_path)
    assert harness.finish([server, *harness.start_clients(cfg, net, address, tmp_path)],
                          90) == [0, 0, 0, 0]
    run = tmp_path / "net"
    steps = [r for r in harness.records(run) if "event" not in r]
    assert [r["loss"] for r in steps] == [r["loss"] for r in local.records if "event" not in r]
    _assert_same(peft_adapter(run), local.adapter)
    summary = json.loads((run / "summary.json").read_text())
    for key in ("epsilon_activations", "epsilon_adapter", "privacy_delta"):
        assert summary[key] == local.summary[key], key
    (event,) = [r for r in harness.records(run) if r.get("event") == "privacy"]
    assert event["epsilon_activations"] == local.summary["epsilon_activations"] > 0
