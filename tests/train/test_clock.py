"""The simulated clock on hand-made records: a server queue, parallel and sequential rounds."""

import pytest

from hsplitlora.hetero.costmodel import ModelDims, Workload, client_flops, server_flops
from hsplitlora.hetero.profiles import DeviceProfile
from hsplitlora.modes import mode_of
from hsplitlora.train.clock import simulate
from tests.conftest import tiny_config

DEV = DeviceProfile(name="d", memory_bytes=10**9, flops=1e9, uplink_bps=1e6, downlink_bps=2e6)
SRV = DeviceProfile(name="s", memory_bytes=10**10, flops=1e10, uplink_bps=1e7, downlink_bps=1e7)


def _records(n_clients: int, up: int = 1000, down: int = 500) -> list[dict]:
    return [{"round": 0, "client": c, "loss": 1.0, "tokens": 8, "bytes_up": up,
             "bytes_down": down} for c in range(n_clients)]


def test_split_round_queues_at_the_server_and_sequential_sl_adds_up():
    dims = ModelDims.from_config(tiny_config("llama"))
    work = Workload.for_precision("fp32", batch=2, seq=8)
    cf, sf = client_flops(dims, 2, {}, work), server_flops(dims, 2, {}, work)
    fwd, bwd, srv = cf.forward / DEV.flops, cf.backward / DEV.flops, sf.total / SRV.flops
    up, down = 1000 / min(DEV.uplink_bps, SRV.downlink_bps), 500 / min(SRV.uplink_bps,
                                                                       DEV.downlink_bps)
    kw = dict(dims=dims, cuts={0: 2, 1: 2}, ranks={}, clients=[DEV, DEV], server=SRV, batch=2,
              seq=8, precision="fp32")
    parallel = simulate(_records(2), mode=mode_of("splitlora"), **kw)
    # both arrive together; the second waits for the first's server compute
    assert parallel == [pytest.approx(fwd + up + 2 * srv + down + bwd)]
    sequential = simulate(_records(2), mode=mode_of("split"), **kw)
    assert sequential == [pytest.approx(2 * (fwd + up + srv + down + bwd))]
    assert sequential[0] > parallel[0]


def test_federated_takes_the_slowest_client_and_aggregation_costs_bandwidth():
    dims = ModelDims.from_config(tiny_config("llama"))
    slow = DEV.model_copy(update={"flops": 5e8})
    records = [{"round": 0, "client": c, "loss": 1.0, "tokens": 8} for c in (0, 1)]
    records.append({"event": "aggregate", "round": 0, "bytes_up": 4000, "bytes_down": 8000})
    kw = dict(dims=dims, cuts={}, ranks={}, server=SRV, batch=2, seq=8, precision="fp32")
    t = simulate(records, mode=mode_of("federated"), clients=[DEV, slow], **kw)
    full = client_flops(dims, dims.n_layers, {}, Workload.for_precision("fp32", 2, 8)).total
    assert t == [pytest.approx(full / 5e8 + 2000 / 1e6 + 4000 / 2e6)]
    central = simulate(records, mode=mode_of("centralized"), clients=[DEV, slow], **kw)
    assert central[0] > t[0] - 4000 / 2e6 - 2000 / 1e6  # one device, no parallelism


def test_aggregation_takes_the_slowest_link_probes_are_timed_and_plans_follow_replans():
    dims = ModelDims.from_config(tiny_config("llama"))
    work = Workload.for_precision("fp32", batch=2, seq=8)
    slow = DEV.model_copy(update={"uplink_bps": 1e5})
    kw = dict(dims=dims, cuts={0: 1, 1: 1}, ranks={}, clients=[DEV, slow], server=SRV,
              batch=2, seq=8, precision="fp32")
    mode = mode_of("hsplitlora")
    steps = [{"round": r, "client": c, "loss": 1.0, "tokens": 8, "bytes_up": 0,
              "bytes_down": 0} for r in (0, 1) for c in (0, 1)]
    base = simulate(steps, mode=mode, **kw)
    # per-link bytes: the slow client's upload decides, not an average over clients
    agg = {"event": "aggregate", "round": 0, "links": [[0, 5000, 100], [1, 1000, 100]],
           "bytes_up": 6000, "bytes_down": 200}
    t = simulate([*steps, agg], mode=mode, **kw)
    link = max(5000 / min(DEV.uplink_bps, SRV.downlink_bps),
               1000 / min(slow.uplink_bps, SRV.downlink_bps)) + 100 / min(SRV.uplink_bps,
                                                                          DEV.downlink_bps)
    assert t[0] - base[0] == pytest.approx(link)
    # a probe: clients in parallel, each batch forward + backward to every weight (3x),
    # the server serving them one after the other
    probe = {"event": "probe", "round": 0, "links": [[0, 0, 0, 2, 2], [1, 0, 0, 2, 2]]}
    t = simulate([*steps, probe], mode=mode, **kw)
    own = 2 * 3 * client_flops(dims, 2, {}, work).forward / DEV.flops
    served = 2 * 2 * 3 * server_flops(dims, 2, {}, work).forward / SRV.flops
    assert t[0] - base[0] == pytest.approx(max(own, served))
    # a replan after round 0 moves both clients to cut 3 for round 1
    plan = {"event": "plan", "round": 0, "plans": [{"cut": 1, "ranks": {}}] * 2}
    replan = {"event": "replan", "round": 0, "plans": [{"cut": 3, "ranks": {}}] * 2}
    moved = simulate([plan, *steps, replan], mode=mode, **kw)
    deeper = simulate(steps, mode=mode, **{**kw, "cuts": {0: 3, 1: 3}})
    assert moved[0] == pytest.approx(base[0])
    assert moved[1] - moved[0] == pytest.approx(deeper[1] - deeper[0])
    assert moved[1] - moved[0] != pytest.approx(base[1] - base[0])


def test_a_u_shaped_step_holds_the_server_through_the_tails_round_trip():
    dims = ModelDims.from_config(tiny_config("llama"))
    work = Workload.for_precision("fp32", batch=2, seq=8)
    cut, tail = 1, 2
    head = client_flops(dims, cut, {}, work)
    tail_s = (client_flops(dims, cut, {}, work, tail).total - head.total) / DEV.flops
    middle = server_flops(dims, cut, {}, work, tail).total / SRV.flops
    # recorded: up = acts 1000 + tail gradient 400, down = middle's output 400 + grad 400
    c_up, c_down = min(DEV.uplink_bps, SRV.downlink_bps), min(SRV.uplink_bps, DEV.downlink_bps)
    kw = dict(dims=dims, cuts={0: cut, 1: cut}, ranks={}, clients=[DEV, DEV], server=SRV,
              batch=2, seq=8, precision="fp32", tail=tail)
    serving = middle + 400 / c_down + tail_s + 400 / c_up
    t = simulate(_records(2, up=1400, down=800), mode=mode_of("splitlora"), **kw)
    # both arrive together; the second waits for the whole of the first's U-shaped service
    assert t == [pytest.approx(head.forward / DEV.flops + 1000 / c_up + 2 * serving
                               + 400 / c_down + head.backward / DEV.flops)]
    # a U-shaped probe: the client's side includes its tail, the server's only the middle
    probe = {"event": "probe", "round": 0, "links": [[0, 0, 0, 2, cut], [1, 0, 0, 2, cut]]}
    probed = simulate([*_records(2, up=1400, down=800), probe], mode=mode_of("hsplitlora"),
                      **kw)
    own = 2 * 3 * client_flops(dims, cut, {}, work, tail).forward / DEV.flops
    served = 2 * 2 * 3 * server_flops(dims, cut, {}, work, tail).forward / SRV.flops
    assert probed[0] - t[0] == pytest.approx(max(own, served))
    assert own > 2 * 3 * head.forward / DEV.flops  # the tail is the client's work


def test_the_simulated_seconds_split_into_steps_aggregation_and_probing():
    from hsplitlora.train.clock import simulated_parts

    dims = ModelDims.from_config(tiny_config("llama"))
    kw = dict(mode=mode_of("hsplitlora"), dims=dims, cuts={0: 1, 1: 2}, ranks={},
              clients=[DEV, DEV.model_copy(update={"uplink_bps": 1e5})], server=SRV,
              batch=2, seq=8, precision="fp32")
    steps = [{"round": r, "client": c, "loss": 1.0, "tokens": 8, "bytes_up": 300,
              "bytes_down": 200} for r in (0, 1) for c in (0, 1)]
    agg = {"event": "aggregate", "round": 0, "links": [[0, 5000, 100], [1, 1000, 100]]}
    probe = {"event": "probe", "round": 1, "links": [[0, 40, 40, 2, 1], [1, 40, 40, 2, 2]]}
    parts = simulated_parts([*steps, agg, probe], **kw)
    assert parts["steps"] == pytest.approx(simulate(steps, **kw)[-1])
    assert parts["aggregation"] == pytest.approx(simulate([*steps, agg], **kw)[-1]
                                                 - parts["steps"])
    assert parts["probing"] == pytest.approx(simulate([*steps, probe], **kw)[-1]
                                             - parts["steps"])
    assert sum(parts.values()) == pytest.approx(simulate([*steps, agg, probe], **kw)[-1])
    assert min(parts.values()) > 0
