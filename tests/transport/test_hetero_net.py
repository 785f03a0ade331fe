"""Heterogeneous modes over gRPC: the server plans, probes and aggregates; clients are
processes that keep their data and run the Client role the server calls.

With a fixed seed, fp32 and the exact wire format the networked run must end bit-identical
to the in-process simulation, plans and losses included.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hsplitlora.checkpoint import load_checkpoint
from hsplitlora.config import RunConfig
from hsplitlora.train import hetero  # noqa: F401 (trusts the types its checkpoints hold)
from hsplitlora.train.run import train
from hsplitlora.transport.config import NetConfig
from tests.transport import harness
from tests.transport.conftest import peft_adapter, run_config


def hetero_config(model_dir, out_dir, aggregator: str = "noisefree", steps: int = 4,
                  mode: str = "hsplitlora", server_side: str | None = None,
                  **train_kw) -> RunConfig:
    cfg = run_config(model_dir, out_dir, mode=mode, steps=steps, **train_kw)
    raw = cfg.model_dump(mode="json")
    raw["hetero"] = {"scenario": {"kind": "heterogeneous", "memory_range": ["1.2 MiB", "3 MiB"],
                                  "seed": 1},
                     "aggregator": aggregator, "rank_set": [0, 2, 4, 8], "server_rank": 4,
                     "probe_batches": 1, "replan_threshold": 0.0,
                     # a deadline no plan reaches: memory alone decides, so the budgets
                     # put the clients at different cuts
                     "round_time_s": 1e9,
                     # no smoothing: each re-measurement moves the energy ranking, so the
                     # run re-plans (over the network too)
                     "ema_beta": 0.0,
                     # hetlora: prune often, so ranks change over the network too
                     "prune_gamma": 0.5, "prune_threshold": 0.9,
                     "server_side": server_side}
    return RunConfig.model_validate(raw)


def _wire_totals(log):
    """A client's link log summed per (direction, what): each reply counts under the call
    it answers (the client answers its calls in order). Values: [whole bytes, payload]."""
    totals: dict[tuple[str, str], list[int]] = {}
    answering = None
    for e in log:
        if e["dir"] == "down" and e["kind"] == "call":
            answering = e["method"]
        what = e["method"] if e["kind"] == "call" else (
            f"reply:{answering}" if e["kind"] == "reply" else e["kind"])
        t = totals.setdefault((e["dir"], what), [0, 0])
        t[0] += e["bytes"]
        t[1] += e["payload"]
    return totals


def _assert_records_are_what_the_wire_carried(records, tmp_path, num_clients, tail=0):
    """Issue 13's accounting check: every byte a client's record claims is a byte its
    link carried. Steps count whole blobs (activations up, the backward call's gradient
    down; a U-shaped step also the tail's gradient up and the middle's output down, which
    the record counts at the tail gradient's size, the two differing in their headers
    only, and the gradient at the cut by its payload);
    aggregation counts the adapter tensors a client uploads and the update (or adapters)
    it downloads, headers aside; probing counts the probe blobs up and their gradients
    down. What is not recorded (control calls, snapshot replies) is small."""
    for cid in range(num_clients):
        wire = _wire_totals(harness.wire_log(tmp_path, cid))
        steps = [r for r in records if "event" not in r and r["client"] == cid]
        links = {event: [link for r in records if r.get("event") == event
                         for link in r["links"] if link[0] == cid]
                 for event in ("start", "aggregate", "probe")}
        adapters = links["start"] + links["aggregate"]  # HetLoRA's hand-out, aggregations
        up, down = sum(s["bytes_up"] for s in steps), sum(s["bytes_down"] for s in steps)
        if tail:
            tail_grads = wire["up", "tailgrad"][0]
            assert up == wire["up", "reply:forward"][0] + tail_grads
            # the gradient at the cut by its payload, as in process (its call's header,
            # a few dozen bytes a step, is not counted)
            assert down == wire["down", "backward"][1] + tail_grads
            assert abs(tail_grads - wire["down", "finish"][0]) < 0.01 * tail_grads
        else:
            assert up == wire["up", "reply:forward"][0]
            assert down == wire["down", "backward"][0]
        assert sum(link[1] for link in adapters) == wire["up", "reply:adapter_state"][1]
        downloads = [wire.get(("down", m), [0, 0]) for m in ("apply_update",
                                                             "load_adapter_state")]
        assert sum(link[2] for link in adapters) == sum(p for _, p in downloads) > 0
        probed = wire.get(("up", "probe"), [0, 0])
        probe_down = wire.get(("down", "probe_grad"), [0, 0])[1]
        if tail:  # the probe blobs whole, the tail's and middle's tensors as payload
            probed = [probed[0] + wire.get(("up", "probe_tailgrad"), [0, 0])[1]]
            probe_down += wire.get(("down", "probe_mid"), [0, 0])[1]
        assert sum(link[1] for link in links["probe"]) == probed[0]
        assert sum(link[2] for link in links["probe"]) == probe_down
        assert (probed[0] > 0) == any(r.get("event") == "probe" for r in records)
        recorded = {("up", "reply:forward"), ("down", "backward"), ("up", "reply:adapter_state"),
                    ("down", "apply_update"), ("down", "load_adapter_state"), ("up", "probe"),
                    ("down", "probe_grad"), ("up", "tailgrad"), ("down", "finish"),
                    ("up", "probe_tailgrad"), ("down", "probe_mid")}
        everything = sum(whole for whole, _ in wire.values())
        headers = sum(whole - payload for key, (whole, payload) in wire.items()
                      if key in recorded and key[1] in ("reply:adapter_state", "apply_update",
                                                        "load_adapter_state", "probe_grad"))
        unrecorded = sum(whole for key, (whole, _) in wire.items() if key not in recorded)
        assert (unrecorded + headers) / everything < 0.06, (cid, unrecorded, headers, everything)


def _assert_no_label_crossed(cfg, tmp_path, records):
    """Every row of labels the clients trained and probed on, as int32 and int64 bytes,
    is in no blob any client's link carried (and no upload has a labels tensor)."""
    from hsplitlora.train.parties import probe_stream, shard_stream
    from hsplitlora.train.run import prepare
    from hsplitlora.transport.wire import read_header

    p = prepare(cfg)
    steps = sum(1 for r in records if "event" not in r) // cfg.train.num_clients
    probes = sum(link[3] for r in records if r.get("event") == "probe" for link in r["links"])
    rows = []
    for cid in range(cfg.train.num_clients):
        for stream, n in ((shard_stream(p, cid), steps), (probe_stream(p, cid), probes)):
            for _ in range(n):
                for row in next(stream)["labels"]:
                    rows += [row.to(dt).numpy().tobytes() for dt in (torch.int32, torch.int64)]
    blobs = [harness.wire_blob(tmp_path, e) for cid in range(cfg.train.num_clients)
             for e in harness.wire_log(tmp_path, cid)]
    assert probes > 0 and len(rows) > 40
    assert not [row for row in rows if any(row in blob for blob in blobs)]
    ups = [harness.wire_blob(tmp_path, e) for cid in range(cfg.train.num_clients)
           for e in harness.wire_log(tmp_path, cid) if e["kind"] in ("reply", "probe")]
    assert not [b for b in ups if "labels" in read_header(b).tensors]


def _steps(records):
    return [(r["round"], r["client"], r["loss"], r["tokens"]) for r in records
            if "event" not in r]


@pytest.mark.parametrize("mode,aggregator,tail", [("hsplitlora", "noisefree", 1),
                                                 ("flexlora", "svd", 0),
                                                 ("hetlora", "zeropad", 0)])
def test_networked_heterogeneous_run_is_bit_identical_to_the_simulation(
        tmp_path, tiny_llama_dir, mode, aggregator, tail):
    """HSplitLoRA, U-shaped: importance probing through the streams (two hops around each
    client's tail), clients planned to different cuts and ranks, noise-free merging and
    re-planning after each merge (threshold 0), no label in any message; FlexLoRA: SVD
    aggregation, adapters loaded back into each client; HetLoRA: truncations of its global
    adapter loaded back, ranks self-pruned (a replan) over the network."""
    cfg = hetero_config(tiny_llama_dir, tmp_path, aggregator, mode=mode, tail=tail)
    local = train(cfg, write=False, show_progress=False)
    net = NetConfig(port=0, step_timeout_s=30, join_timeout_s=60)
    server, address = harness.serve_loopback(cfg, net, tmp_path)
    codes = harness.finish([server, *harness.start_clients(cfg, net, address, tmp_path,
                                                           wire_logs=True)], 150)
    assert codes == [0, 0, 0, 0]
    run = tmp_path / "net"
    records = harness.records(run)
    _assert_records_are_what_the_wire_carried(records, tmp_path, cfg.train.num_clients, tail)
    if tail:
        _assert_no_label_crossed(cfg, tmp_path, records)
    plans = [r["plans"] for r in records if r.get("event") == "plan"]
    assert plans == [r["plans"] for r in local.records if r.get("event") == "plan"]
    if mode == "hsplitlora":
        assert len({p["cut"] for p in plans[0]}) > 1  # the clients really differ in cut
        assert any(r.get("event") == "replan" for r in records)
    if mode == "hetlora":
        replans = [r["plans"] for r in records if r.get("event") == "replan"]
        assert replans and replans == [r["plans"] for r in local.records
                                       if r.get("event") == "replan"]
    assert _steps(records) == _steps(local.records)
    adapter = peft_adapter(run)
    assert set(adapter) == set(local.adapter) and adapter
    for k, v in local.adapter.items():
        assert torch.equal(adapter[k], v), k
    # bytes on the wire, not tensor sizes: activations carry a uint8 mask and int32 labels
    steps = [r for r in records if "event" not in r]
    sim = [r for r in local.records if "event" not in r]
    assert all(n["bytes_up"] < s["bytes_up"] for n, s in zip(steps, sim, strict=True))
    if mode == "flexlora":  # each client ends with its share of the aggregate, at its rank
        for i, plan in enumerate(plans[0]):
            held = load_file(tmp_path / f"client-{i}.safetensors")
            want = {m: r for m, r in plan["ranks"].items()
                    if r and int(m.split(".")[2]) < plan["cut"]}
            assert {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in held.items()
                    if k.endswith("lora_A.weight")} == want


@pytest.mark.parametrize("mode,aggregator", [("hsplitlora", "noisefree"), ("flexlora", "svd")])
def test_with_a_separate_fed_server_no_client_adapter_reaches_the_main_server(
        tmp_path, tiny_llama_dir, mode, aggregator):
    """`hsplitlora fedserver` in the heterogeneous modes: clients upload their adapters to
    it, the main server its server-side copies; only the aggregate comes back. The main
    server process refuses to ask any client for its adapter, and the run still ends
    bit-identical to the simulation. (A shared server side cannot run this way yet.)"""
    cfg = hetero_config(tiny_llama_dir, tmp_path, aggregator, mode=mode,
                        server_side="per_participant" if mode == "hsplitlora" else None)
    local = train(cfg, write=False, show_progress=False)
    fed_port, fed_port_file = harness.free_port(), tmp_path / "fed-port"
    fed = harness.start_fed(cfg, NetConfig(fed_port=fed_port, step_timeout_s=30),
                            port_file=fed_port_file)
    harness.wait_for(fed_port_file.exists, 60, "the fed server to listen")
    net = NetConfig(port=0, fed_address=f"127.0.0.1:{fed_port}", step_timeout_s=30,
                    join_timeout_s=60)
    server, address = harness.serve_loopback(cfg, net, tmp_path, sealed=True)
    clients = harness.start_clients(cfg, net, address, tmp_path)
    assert harness.finish([server, fed, *clients], 150) == [0] * 5
    records = harness.records(tmp_path / "net")
    assert _steps(records) == _steps(local.records)
    aggregates = [(r["round"], r["clients"], r["bytes_up"], r["bytes_down"]) for r in records
                  if r.get("event") == "aggregate"]
    assert aggregates and aggregates == [(r["round"], r["clients"], r["bytes_up"],
                                          r["bytes_down"]) for r in local.records
                                         if r.get("event") == "aggregate"]
    adapter = peft_adapter(tmp_path / "net")
    assert set(adapter) == set(local.adapter) and adapter
    for k, v in local.adapter.items():
        assert torch.equal(adapter[k], v), k


def test_a_heterogeneous_client_killed_mid_run_is_dropped_and_rejoins_in_sync(
        tmp_path, tiny_llama_dir):
    """Client 1 dies inside round 2; the others finish the round. Restarted, it is
    admitted at a later round with its plan, the merged base weights and fresh adapters,
    and its steps there agree with the server's copy of the state. (The survivors wait
    in round 6 until the restarted client's hello is sent, so it is admitted at round 7
    however slow the machine.)"""
    cfg = hetero_config(tiny_llama_dir, tmp_path, steps=8)
    net = NetConfig(port=0, step_timeout_s=30, join_timeout_s=60, rejoin_backoff_s=0.2)
    server, address = harness.serve_loopback(cfg, net, tmp_path)
    gate = tmp_path / "client-1b-joined"
    clients = harness.start_clients(cfg, net, address, tmp_path, die={1: 2},
                                    hold={0: (6, gate), 2: (6, gate)})
    harness.wait_for(lambda: clients[1].exitcode is not None, 90, "client 1 to die")
    back = harness.start_client(cfg, net, 1, address, tmp_path / "client-1b.safetensors",
                                joined=gate)
    codes = harness.finish([server, clients[0], clients[2], back], 150)
    assert codes == [0, 0, 0, 0]
    steps = [r for r in harness.records(tmp_path / "net") if "event" not in r]
    rounds_of_1 = sorted({r["round"] for r in steps if r["client"] == 1})
    assert 2 not in rounds_of_1 and {0, 1} <= set(rounds_of_1)
    assert max(rounds_of_1) == 7  # back before the end
    assert {r["round"] for r in steps if r["client"] == 0} == set(range(8))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    aggregates = {r["round"]: r["clients"] for r in harness.records(tmp_path / "net")
                  if r.get("event") == "aggregate"}
    assert aggregates[1] == [0, 1, 2] and aggregates[3] == [0, 2] and aggregates[7] == [0, 1, 2]


def test_a_killed_heterogeneous_deployment_resumes_to_the_uninterrupted_result(
        tmp_path, tiny_llama_dir):
    """The server and client 0 are SIGKILLed together mid-run. The server resumes from
    its checkpoint (merged weights, plans, importance history, server-side copies),
    client 0 from its own (`join --resume`: optimizer, data position, RNG), clients 1 and
    2 rewind to their in-memory snapshots: the run ends bit-identical to the simulation,
    each step recorded once."""
    cfg = hetero_config(tiny_llama_dir, tmp_path, steps=8)
    local = train(cfg, write=False, show_progress=False)
    net = NetConfig(port=harness.free_port(), step_timeout_s=30, join_timeout_s=60,
                    rejoin_backoff_s=0.1, rejoin_attempts=30)
    server, address = harness.serve_loopback(cfg, net, tmp_path)
    own = tmp_path / "client-0.pt"
    first = harness.start_client(cfg, net, 0, address, tmp_path / "client-0.safetensors",
                                 checkpoint=own)
    others = [harness.start_client(cfg, net, i, address, tmp_path / f"client-{i}.safetensors")
              for i in (1, 2)]
    saved = tmp_path / "net" / "checkpoint" / "server.pt"

    def checkpointed(at_least: int) -> bool:
        return saved.exists() and load_checkpoint(saved)["round"] >= at_least

    harness.wait_for(lambda: checkpointed(4), 120, "round 4's checkpoint")
    server.kill()
    first.kill()
    harness.finish([server, first], 10)
    killed_at = load_checkpoint(saved)["round"]
    assert killed_at < cfg.train.steps - 1
    assert load_checkpoint(own)["round"] >= killed_at
    resumed, _ = harness.serve_loopback(cfg, net, tmp_path, resume=True)
    again = harness.start_client(cfg, net, 0, address, tmp_path / "client-0.safetensors",
                                 checkpoint=own, resume=True)
    assert harness.finish([resumed, again, *others], 150) == [0, 0, 0, 0]
    records = harness.records(tmp_path / "net")
    assert _steps(records) == _steps(local.records)
    assert [r["step"] for r in records if "step" in r] == list(range(1, 25))
    adapter = peft_adapter(tmp_path / "net")
    assert set(adapter) == set(local.adapter) and adapter
    for k, v in local.adapter.items():
        assert torch.equal(adapter[k], v), k


def test_a_heterogeneous_step_whose_result_is_not_finite_is_undone_and_never_checkpointed(
        tmp_path, tiny_llama_dir):
    """Client 0's activations of round 1 are all 3e38: finite, and with a bound as loose as
    fp32 allows (``net.max_activation``) they pass validation, so the hub's step itself
    must catch the overflow. The step is undone, client 0 is dropped from round 1 (it
    reconnects), the others finish every round, and neither the checkpoint nor the final
    adapter holds a non-finite value."""
    cfg = hetero_config(tiny_llama_dir, tmp_path)
    net = NetConfig(port=0, step_timeout_s=30, join_timeout_s=60, rejoin_backoff_s=0.2,
                    max_activation=3.4e38)
    server, address = harness.serve_loopback(cfg, net, tmp_path)
    evil = harness.start_client(cfg, net, 0, address, tmp_path / "client-0.safetensors",
                                poison_at=1)
    others = [harness.start_client(cfg, net, i, address, tmp_path / f"client-{i}.safetensors")
              for i in (1, 2)]
    assert harness.finish([server, evil, *others], 150) == [0, 0, 0, 0]
    steps = [r for r in harness.records(tmp_path / "net") if "event" not in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert 1 not in {r["round"] for r in steps if r["client"] == 0}
    for cid in (1, 2):
        assert {r["round"] for r in steps if r["client"] == cid} == set(range(4))
    saved = load_checkpoint(tmp_path / "net" / "checkpoint" / "server.pt")
    tensors = [v for g in saved["system"]["server"]["groups"] for v in g["adapter"].values()]
    assert tensors and all(torch.isfinite(v).all() for v in tensors)
    adapter = peft_adapter(tmp_path / "net")
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
