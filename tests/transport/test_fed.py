"""The fed server's rounds: id-ordered FedAvg whatever the arrival order, renormalised
weights when clients leave or stay silent, and a clear refusal for outsiders."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from hsplitlora.roles.fedserver import FedServer
from hsplitlora.transport.fed import FedService, adapter_layout
from hsplitlora.transport.wire import unpack

KEYS = ("model.layers.0.self_attn.q_proj.lora_A.weight",
        "model.layers.0.self_attn.q_proj.lora_B.weight")


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {KEYS[0]: torch.randn(4, 8, generator=g), KEYS[1]: torch.randn(8, 4, generator=g)}


def _service(timeout=5.0):
    return FedService(FedServer(alpha=8), adapter_layout(_state(0)), timeout)


def _submit_all(service, round, clients, results):
    def go(cid):
        results[cid] = unpack(service.submit(round, cid, _state(cid), 10 * (cid + 1)))

    threads = [threading.Thread(target=go, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    return threads


def test_aggregate_is_the_id_ordered_fedavg_whatever_the_arrival_order():
    service = _service()
    service.open(0, [0, 1, 2])
    order = [2, 0, 1]
    random.Random(1).shuffle(order)
    results: dict[int, dict] = {}
    for t in _submit_all(service, 0, order, results):
        t.join(10)
    expected = FedServer(alpha=8).aggregate([_state(i) for i in range(3)], [10, 20, 30])
    for cid in range(3):
        assert all(torch.equal(results[cid][k], expected[k]) for k in KEYS)
    assert service.latest_round == 0 and service.wait(0, 0)


def test_a_client_that_leaves_is_dropped_and_weights_renormalise():
    service = _service()
    service.open(3, [0, 1, 2])
    results: dict[int, dict] = {}
    threads = _submit_all(service, 3, [0, 2], results)
    assert not service.wait(3, 0.1)  # still waiting for client 1
    service.open(3, [0, 2])  # the main server saw client 1 go
    for t in threads:
        t.join(10)
    w0, w2 = 10 / 40, 30 / 40
    for k in KEYS:
        torch.testing.assert_close(results[0][k], w0 * _state(0)[k] + w2 * _state(2)[k],
                                   rtol=0, atol=1e-6)


def test_a_silent_client_is_left_out_after_the_timeout():
    service = _service(timeout=0.3)
    service.open(0, [0, 1])
    results: dict[int, dict] = {}
    for t in _submit_all(service, 0, [1], results):
        t.join(10)
    assert all(torch.equal(results[1][k], _state(1)[k]) for k in KEYS)  # alone: its own


def test_a_client_outside_the_round_is_refused():
    service = _service()
    service.open(0, [0])
    with pytest.raises(LookupError, match="client 5 has no part in aggregation round 0"):
        service.submit(0, 5, _state(5), 1)


def test_latest_waits_for_the_round_asked_for_and_state_survives_a_restart():
    service = _service()
    assert service.latest(0, 0.0) is None
    service.open(0, [0])
    service.submit(0, 0, _state(0), 1)
    round_, blob = service.latest(0, 0.0)
    assert round_ == 0 and service.latest(1, 0.05) is None
    restored = _service()
    restored.load_state_dict(service.state_dict())
    assert restored.latest(0, 0.0) == (0, blob)
    assert all(torch.equal(restored.latest_state()[k], _state(0)[k]) for k in KEYS)
