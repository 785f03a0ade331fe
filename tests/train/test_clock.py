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
