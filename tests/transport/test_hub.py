"""The pieces of a networked heterogeneous run, without processes: the call protocol's
encodings, the checks on what a client sends, and the resynchronisation of a client that
(re)joins after merges."""

from __future__ import annotations

import math

import pytest
import torch

from hsplitlora.models.lora import (
    LoraSettings,
    adapter_shapes,
    attach_lora,
    lora_state,
    matrix_shapes,
)
from hsplitlora.models.split import arch_spec, split_model
from hsplitlora.train.hetero import HeteroSystem, PartyPlan, run_hetero
from hsplitlora.train.parties import optim_settings, probe_stream, shard_stream
from hsplitlora.train.placement import PartyLost
from hsplitlora.train.recorder import Recorder
from hsplitlora.train.run import prepare
from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport.calls import (
    Call,
    pack_updates,
    read_call,
    read_scores,
    settings_from_json,
    settings_to_json,
    unpack_updates,
)
from hsplitlora.transport.client import Link
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.host import RoleHost
from hsplitlora.transport.hub import HeteroHub, RemoteClient
from hsplitlora.transport.server import Session
from hsplitlora.transport.wire import Blob, WireError, pack
from tests.conftest import tiny_model
from tests.transport import harness
from tests.transport.test_hetero_net import hetero_config

PLANS = [
    PartyPlan(1, {"model.layers.0.self_attn.q_proj": 2, "model.layers.2.self_attn.v_proj": 4}),
    PartyPlan(3, {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.up_proj": 8,
                  "model.layers.3.mlp.down_proj": 2}),
    PartyPlan(2, {"model.layers.1.mlp.up_proj": 2}),
]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_shapes_predict_what_attach_lora_builds(arch):
    model = tiny_model(arch)
    shapes = matrix_shapes(model)
    modules = sorted(shapes)
    settings = LoraSettings(r=4, ranks={modules[0]: 2, modules[1]: 0, modules[-1]: 8})
    client, _ = split_model(attach_lora(model, settings), 2)
    held = {m: s for m, s in shapes.items() if m in {n.rsplit(".lora_", 1)[0]
                                                    for n in lora_state(client)}}
    got = {k: tuple(v.shape) for k, v in lora_state(client).items()}
    assert got == adapter_shapes(held, settings, arch_spec(model.config).default_targets)
    assert got
    assert matrix_shapes(client) == {m: s for m, s in shapes.items() if m in matrix_shapes(client)}


def test_settings_and_updates_survive_the_wire_and_bad_ones_are_refused():
    s = LoraSettings(r=8, alpha=16.0, dropout=0.1, targets=("q_proj", "v_proj"),
                     ranks={"a": 2, "b": 0}, alphas={"a": 4.0}, init_seed=12345)
    assert settings_from_json(settings_to_json(s)) == s
    with pytest.raises(WireError, match="LoRA settings"):
        settings_from_json({"r": 8})
    updates = {"m1": torch.randn(6, 4), "m2": (torch.randn(6, 3), torch.randn(3, 4))}
    shapes = {"m1": (6, 4), "m2": (6, 4)}
    back = unpack_updates(pack_updates(updates), shapes, "u")
    assert torch.equal(back["m1"], updates["m1"])
    assert all(torch.equal(a, b) for a, b in zip(back["m2"], updates["m2"], strict=True))
    with pytest.raises(WireError, match="does not hold"):
        unpack_updates({"m3": torch.zeros(6, 4)}, shapes, "u")
    with pytest.raises(WireError, match="expected"):
        unpack_updates({"m1": torch.zeros(4, 6)}, shapes, "u")
    with pytest.raises(WireError, match="finite"):
        unpack_updates({"m1": torch.full((6, 4), math.nan)}, shapes, "u")
    with pytest.raises(WireError, match="factors"):
        unpack_updates({"m2.U": torch.zeros(6, 3), "m2.V": torch.zeros(2, 4)}, shapes, "u")
    call = read_call(pack({"x": torch.ones(2)}, {"method": "score", "args": '{"n": 3}'}))
    assert (call.method, call.args) == ("score", {"n": 3}) and torch.equal(call.tensors["x"],
                                                                           torch.ones(2))
    with pytest.raises(WireError, match="JSON"):
        read_call(pack({}, {"method": "score", "args": "{"}))
    assert read_scores({"scores": '{"a": 0.5}'}, {"a", "b"}, "s") == {"a": 0.5}
    for bad, why in [('{"c": 1}', "does not hold"), ('{"a": -1}', ">= 0"),
                     ('{"a": NaN}', ">= 0"), ("[1]", "object")]:
        with pytest.raises(WireError, match=why):
            read_scores({"scores": bad}, {"a", "b"}, "s")


@pytest.fixture
def hub(tmp_path, tiny_llama_dir):
    cfg = hetero_config(tiny_llama_dir, tmp_path)
    hub = HeteroHub(cfg, NetConfig(port=0), None).bind(prepare(cfg))
    yield hub
    hub.close()


def _proxy(hub: HeteroHub, cut: int = 2) -> tuple[RemoteClient, Session]:
    settings = LoraSettings(r=4, alpha=8, ranks={"model.layers.1.self_attn.q_proj": 0},
                            targets=("q_proj",))
    proxy = RemoteClient(hub, 0, 10, cut, settings)
    session = Session(pb.Hello(client_id=0, codec="none", mode="hsplitlora"), 1 << 20)
    proxy.session = session
    return proxy, session


def _acts(hidden: torch.Tensor) -> bytes:
    b, s, _ = hidden.shape
    return pack({"hidden": hidden, "attention_mask": torch.ones(b, s, dtype=torch.uint8),
                 "labels": torch.zeros(b, s, dtype=torch.int32)})


@pytest.mark.parametrize("problem,match", [
    ("nan", "non-finite"), ("shape", "shape"), ("kind", "'probe' blob"), ("error", "disk full")])
def test_a_bad_reply_drops_the_client_with_the_reason(hub, problem, match):
    proxy, session = _proxy(hub)
    hidden = torch.zeros(2, 5, hub.plan.hidden_size)
    if problem == "nan":
        hidden[0, 1, 2] = math.nan
    if problem == "shape":
        hidden = torch.zeros(2, 5, hub.plan.hidden_size + 1)
    kind = {"kind": "probe", "error": "error"}.get(problem, "reply")
    data = pack({}, {"message": "disk full"}) if problem == "error" else _acts(hidden)
    session.inbox.put(Blob(kind, 0, data))
    with pytest.raises(PartyLost, match=match):
        proxy.forward()
    assert not proxy.here and session.gone.is_set()
    with pytest.raises(PartyLost, match="not connected"):  # until it reconnects
        proxy.adapter_state()
    proxy.reset_adapters(proxy.settings)  # calls that return nothing are dropped quietly


def test_an_adapter_of_the_wrong_rank_is_refused(hub):
    proxy, session = _proxy(hub)
    good = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
            "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)}
    session.inbox.put(Blob("reply", 0, pack(good)))
    assert set(proxy.adapter_state()) == set(good)
    bad = {**good, "model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 32)}
    session.inbox.put(Blob("reply", 0, pack(bad)))
    with pytest.raises(PartyLost, match="expected"):
        proxy.adapter_state()


def test_a_client_that_joins_after_merges_is_built_exactly_like_the_simulated_one(
        tmp_path, tiny_llama_dir):
    """The server sends the plan and what was merged into the client's blocks; the
    client builds from its own pristine base and ends up with the simulated client's
    segment: same base weights, same (seeded) adapters."""
    cfg = hetero_config(tiny_llama_dir, tmp_path)
    p = prepare(cfg)
    optim = optim_settings(cfg, 4)
    system = HeteroSystem(p.model, PLANS, [shard_stream(p, c) for c in range(3)],
                          [len(s) for s in p.shards], client_optim=optim, server_optim=optim,
                          alpha=8.0, precision="fp32", seed=3,
                          probes=[probe_stream(p, c) for c in range(3)])
    run_hetero(system, 2, 1, Recorder(None, 2, show_progress=False))
    hub = HeteroHub(cfg, NetConfig(port=0), None).bind(p)
    try:
        hub.watch_base(system.base)
        for cid, plan in enumerate(PLANS):
            deltas, version = hub.merged_deltas(plan.cut)
            assert deltas and all(hub.block_of(n) < plan.cut for n in deltas)
            assert version == system.version == 2
            host = RoleHost(prepare(cfg), cid, NetConfig(), "unused:1")
            args = {"cut": plan.cut, "settings": settings_to_json(system.settings(cid)),
                    "version": version}
            host._build(None, Call("build", args, deltas, None))  # type: ignore[arg-type]
            assert host.client is not None
            want = dict(system.clients[cid].segment.named_parameters())
            got = dict(host.client.segment.named_parameters())
            assert set(got) == set(want)
            for name, value in want.items():
                assert torch.equal(got[name], value), name
    finally:
        hub.close()


def test_a_resume_without_a_checkpoint_is_refused_up_front(tmp_path, tiny_llama_dir):
    from hsplitlora.transport.deploy import join, serve

    cfg = hetero_config(tiny_llama_dir, tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nothing to resume"):
        serve(cfg, NetConfig(), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nothing to resume"):
        join(cfg, NetConfig(), 0, "127.0.0.1:1", resume=True, checkpoint=tmp_path / "none.pt")


@pytest.mark.parametrize("kind", ["reply", "error"])
@pytest.mark.parametrize("header", [
    b'{"hidden":{"dtype":"F32","shape":[2,40,1e400],"data_offsets":[0,4]}}',
    b'{"__metadata__":[1]}', b"[" * 100_000 + b"]" * 100_000])
def test_headers_that_killed_the_server_drop_only_that_client_in_the_hub(hub, kind, header):
    proxy, session = _proxy(hub)
    session.inbox.put(Blob(kind, 0, len(header).to_bytes(8, "little") + header + b"\0" * 4))
    with pytest.raises(PartyLost, match="client 0"):
        proxy.forward()
    assert not proxy.here and session.gone.is_set()


def test_huge_finite_activations_drop_the_client_in_the_hub(hub):
    proxy, session = _proxy(hub)
    session.inbox.put(Blob("reply", 0, _acts(torch.full((2, 5, hub.plan.hidden_size), 3e38))))
    with pytest.raises(PartyLost, match=r"magnitude 3e\+38, beyond the bound"):
        proxy.forward()


def test_the_hub_derives_its_upload_limit_from_the_run_and_refuses_what_is_larger(hub):
    """Unset ``net.max_tensor_mb``: the hub accepts one batch of activations, or the
    widest adapter a plan could give a client, and not 2 GB; a larger upload through the
    wire is refused at its first frame, and the stream stays usable."""
    limit = hub.upload_limit("none")
    widest = max(hub.cfg.lora.r, *hub.cfg.hetero.rank_set)
    adapter = sum(widest * (d_in + d_out) * 4 for d_out, d_in in hub._shapes.values())
    assert limit == max(hub.plan.upload_bytes("none"), adapter + (1 << 16))
    assert limit < 1 << 20
    link = Link(f"127.0.0.1:{hub.port}", hub.net, pb.Hello(
        client_id=0, cut=-1, num_samples=10, codec="none", mode="hsplitlora"), None)
    try:
        harness.wait_for(lambda: 0 in hub._pending, 10, "the hub to register the stream")
        inbox = hub._pending[0].inbox
        b, s, h = hub.plan.batch_size, hub.plan.max_length, hub.plan.hidden_size
        link.send("reply", 0, b"\0" * (limit + 1))
        refused = inbox.get(timeout=10)
        assert isinstance(refused, WireError)
        assert f"exceeds the limit of {limit} bytes (net.max_tensor_mb)" in str(refused)
        batch = _acts(torch.zeros(b, s, h))
        link.send("reply", 0, batch)
        assert inbox.get(timeout=10) == Blob("reply", 0, batch)
    finally:
        link.close()


def test_a_heterogeneous_client_that_keeps_timing_out_is_backed_off(hub):
    """As on the homogeneous server: after two failed steps in a row (here a timeout and
    a refused upload) a reconnecting client sits out 2 rounds, unless nobody else trains;
    a step that goes through clears its strikes."""
    proxy, session = _proxy(hub)
    hub.clients = {0: proxy}
    hub.net = hub.net.model_copy(update={"step_timeout_s": 0.05})
    proxy.round = 3
    with pytest.raises(PartyLost, match="no activations"):
        proxy.forward()  # strike 1: timed out
    proxy.session = session = Session(pb.Hello(client_id=0, codec="none"), 1 << 20)
    session.inbox.put(Blob("reply", 3, b"junk"))
    with pytest.raises(PartyLost, match="refused"):
        proxy.forward()  # strike 2: its upload was refused
    assert hub.backoff.strikes[0] == 2 and hub.backoff.until[0] == 3 + 1 + 2
    other, _ = _proxy(hub)
    other.client_id = 1
    hub.clients[1] = other  # someone else trains, so the struck client waits
    back = Session(pb.Hello(client_id=0, codec="none"), 1 << 20)
    hub._pending = {0: back}
    hub._admit(4)
    assert hub._pending == {0: back} and not proxy.here
    other.session = None  # nobody else: a slow client beats none
    hub.clients[0].admit = lambda s, r: setattr(proxy, "session", s)
    hub._admit(5)
    assert hub._pending == {} and proxy.session is back
    hub.backoff.clear(0)  # a step went through: the next failure is a first strike again
    hub.backoff.strike(0, 10)
    assert hub.backoff.strikes[0] == 1 and hub.backoff.ready(0, 11)
