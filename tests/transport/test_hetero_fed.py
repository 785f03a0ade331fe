"""The heterogeneous fed server's rendezvous, without a network: what it accepts, what it
refuses, and that it combines exactly as the simulation does."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from hsplitlora import aggregate as agg
from hsplitlora.models.lora import LoraSettings, adapter_shapes, matrix_shapes
from hsplitlora.models.split import arch_spec
from hsplitlora.train.hetero import Contribution, combine
from hsplitlora.transport.calls import settings_to_json
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.hetero_fed import HeteroFedService, RemoteFedAggregation
from hsplitlora.transport.wire import WireError, pack, read_header, unpack
from tests.conftest import tiny_model

ALPHA = 8.0
CUTS = {0: 1, 1: 2, 2: 3}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _parts(model, cid: int) -> tuple[LoraSettings, dict, dict]:
    """Client ``cid``'s settings, client-side and server-side adapter (random values)."""
    spec = arch_spec(model.config)
    shapes = matrix_shapes(model, spec.targets)
    settings = LoraSettings(r=4, alpha=ALPHA, targets=("q_proj", "v_proj"),
                            ranks={m: 2 + cid for m in shapes})
    g = torch.Generator().manual_seed(cid)
    cut = CUTS[cid]
    layout = adapter_shapes(shapes, settings, spec.default_targets)

    def state(keep):
        return {k: torch.randn(s, generator=g) for k, s in layout.items()
                if keep(spec.block_of(k))}

    return settings, state(lambda b: b < cut), state(lambda b: b >= cut)


def _service(model, aggregator: str, timeout: float = 5.0) -> HeteroFedService:
    spec = arch_spec(model.config)
    return HeteroFedService(aggregator, ALPHA, matrix_shapes(model, spec.targets), spec,
                            timeout, last_round=9)


def _request(model, ids, **override) -> bytes:
    parties, tensors = {}, {}
    for cid in ids:
        settings, _, server = _parts(model, cid)
        parties[cid] = {"cut": CUTS[cid], "num_samples": 10 * (cid + 1),
                        "settings": settings_to_json(settings), **override}
        tensors.update({f"{cid}/{k}": v for k, v in server.items()})
    return pack(tensors, {"parties": json.dumps(parties)})


def _upload_all(service, model, ids, done, round=0):
    """One thread per client, as the gRPC front runs them: wait for the round to open
    (its layout), then submit; ``done`` gets the ids whose upload was acknowledged."""
    def upload(cid):
        _, client, _ = _parts(model, cid)
        if service.layout_for(round, cid) == {k: ("F32", tuple(v.shape))
                                              for k, v in client.items()}:
            service.submit(round, cid, client, 1)
            done.append(cid)

    return [threading.Thread(target=upload, args=(cid,), daemon=True) for cid in ids]


@pytest.mark.parametrize("aggregator", ["noisefree", "svd"])
def test_the_fed_server_combines_exactly_as_the_simulation(model, aggregator):
    service = _service(model, aggregator)
    done: list[int] = []
    threads = _upload_all(service, model, [0, 1, 2], done)
    result = {}
    combiner = threading.Thread(target=lambda: result.update(
        blob=service.combine(0, _request(model, [0, 1, 2]))))
    for t in threads:
        t.start()
    combiner.start()
    combiner.join(10)
    for t in threads:
        t.join(10)
    assert sorted(done) == [0, 1, 2]
    states = []
    for cid in range(3):
        _, client, server = _parts(model, cid)
        states.append(agg.from_peft_state_dict({**client, **server}, ALPHA))
    expected = combine(aggregator, states, [10, 20, 30])
    got = unpack(result["blob"])
    if aggregator == "noisefree":
        for m, u in expected.items():
            if isinstance(u, torch.Tensor):
                assert torch.equal(got[m], u)
            else:
                assert torch.equal(got[f"{m}.U"], u[0]) and torch.equal(got[f"{m}.V"], u[1])
    else:  # each participant's adapter, and FlexLoRA's global model: the exact update
        for cid, out in enumerate(expected.outputs):
            for k, v in agg.to_peft_state_dict(out).items():
                assert torch.equal(got[f"{cid}/{k}"], v)
        glob = agg.to_peft_state_dict(expected.glob)
        assert glob and all(torch.equal(got[f"global/{k}"], v) for k, v in glob.items())


def test_a_late_client_is_left_out_and_the_weights_renormalise(model):
    service = _service(model, "noisefree", timeout=0.5)
    done: list[int] = []
    threads = _upload_all(service, model, [0, 2], done)
    for t in threads:
        t.start()
    blob = service.combine(0, _request(model, [0, 1, 2]))
    for t in threads:
        t.join(10)
    assert sorted(done) == [0, 2]
    assert read_header(blob).meta["clients"] == "0,2"
    with pytest.raises(LookupError, match="no part in aggregation round 0"):
        service.submit(0, 1, _parts(model, 1)[1], 1)  # too late: the round is over


def test_the_fed_server_refuses_what_does_not_fit_the_plan(model):
    service = _service(model, "noisefree", timeout=0.5)
    with pytest.raises(LookupError, match="never opened"):
        service.layout_for(3, 0)
    with pytest.raises(WireError, match="party 0 is malformed"):
        service.combine(1, _request(model, [0], cut="deep"))
    with pytest.raises(WireError, match="LoRA settings in a call are malformed"):
        service.combine(1, _request(model, [0], settings=None))
    with pytest.raises(WireError, match="cut 99"):
        service.combine(1, _request(model, [0], cut=99))
    threading.Thread(target=service.combine, args=(2, _request(model, [0])),
                     daemon=True).start()
    layout = service.layout_for(2, 0)
    assert layout == {k: ("F32", tuple(v.shape)) for k, v in _parts(model, 0)[1].items()}
    with pytest.raises(LookupError, match="client 1 has no part"):
        service.layout_for(2, 1)


def test_the_main_server_refuses_a_result_that_does_not_fit_what_it_asked(model):
    spec = arch_spec(model.config)
    remote = RemoteFedAggregation("127.0.0.1:1", NetConfig(), None, aggregator="svd",
                                  alpha=ALPHA, shapes=matrix_shapes(model, spec.targets))
    asked = {}
    for cid in (0, 1):
        settings, client, server = _parts(model, cid)
        asked[cid] = Contribution(None, 10, CUTS[cid], settings,
                                  {k: tuple(v.shape) for k, v in client.items()}, server)
    good = {f"{cid}/{k}": v for cid in (0, 1) for k, v in
            {**_parts(model, cid)[1], **_parts(model, cid)[2]}.items()}
    ids, result, up = remote._read(pack(good, {"clients": "0,1", "bytes_up": "7"}), asked, "r")
    assert ids == [0, 1] and up == 7 and set(result.outputs) == {0, 1}
    with pytest.raises(WireError, match="not a subset"):
        remote._read(pack(good, {"clients": "0,5"}), asked, "r")
    short = {k: v for k, v in good.items() if not k.startswith("1/")}
    with pytest.raises(WireError, match="client 1's adapter has tensors"):
        remote._read(pack(short, {"clients": "0,1"}), asked, "r")
    bad = {**good, next(iter(good)): torch.full_like(next(iter(good.values())), float("nan"))}
    with pytest.raises(WireError, match="finite"):
        remote._read(pack(bad, {"clients": "0,1"}), asked, "r")


def test_the_fed_server_derives_its_upload_limit_from_the_widest_adapter(model):
    """A heterogeneous fed server takes at most the widest adapter a plan could give a
    client (every matrix at the largest rank), not net.max_tensor_mb's 2 GB."""
    from hsplitlora.transport.fed import FederationServicer
    from hsplitlora.transport.plan import layout_bytes
    from hsplitlora.transport.wire import frames

    spec = arch_spec(model.config)
    shapes = matrix_shapes(model, spec.targets)
    service = HeteroFedService("noisefree", ALPHA, shapes, spec, 5.0, last_round=9,
                               ranks=[4, 2, 8])
    widest = adapter_shapes(shapes, LoraSettings(r=8, targets=spec.targets),
                            spec.default_targets)
    assert service.upload_bytes == layout_bytes({k: ("F32", s) for k, s in widest.items()})
    net = NetConfig()
    assert service.upload_bytes < 1 << 20 < net.max_tensor_bytes
    front = FederationServicer(service, None, net)
    with pytest.raises(WireError, match=f"exceeds the limit of {service.upload_bytes} bytes"):
        front._receive(frames(b"\0" * (service.upload_bytes + 1), "adapter", 0, 0, 1 << 16), 0)
