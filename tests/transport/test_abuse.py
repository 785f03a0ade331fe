"""Hostile uploads against a live main server: refused, and the run is what it would be
without them.

Each test first sends what used to kill or poison the server (issue 15), then checks the
server is still up, the attacker got a refusal naming the problem, and the honest
client's steps equal an in-process replay of the accepted uploads alone.
"""

from __future__ import annotations

import json
import struct
import threading
import time

import pytest
import torch

from hsplitlora.checkpoint import load_checkpoint
from hsplitlora.models.lora import lora_state
from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport.client import Link, StepRefused
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.security import Refused
from tests.transport.live import activations, remote, serving
from tests.transport.test_wire_fuzz import KILLERS


def _state(server):
    return lora_state(server.segments[0])


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _raw(header: object) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + b"\0" * 4


def _refusal(link, timeout=10.0) -> str:
    got = link.receive(timeout)
    assert isinstance(got, pb.Control) and got.kind == pb.Control.REFUSED, got
    return got.message


def _honest_round(live, good, t, seed):
    upload = activations(seed)
    good.round = t
    reply = good.step(1, upload)
    expected = live.reference.step(1, upload)
    assert reply.loss == expected.loss and torch.equal(reply.grad, expected.grad)


def _poison_two_rounds(live, refusal: str, seed: int) -> None:
    """Client 0 uploads finite activations of magnitude 3e38 in rounds 0 and 1 and is
    refused with ``refusal`` each time; client 1's steps (seeds ``seed + t``) are exact."""
    evil, honest = live.welcomed(0, 1)
    bad, good = remote(evil), remote(honest)
    poison = activations(0, hidden=torch.full((2, 12, 32), 3.0e38))
    for t in range(2):
        bad.round = t
        with pytest.raises(StepRefused, match=refusal):
            bad.step(0, poison)
        _honest_round(live, good, t, seed + t)


def test_headers_that_killed_the_server_are_refused_and_the_run_goes_on():
    killers = [h for h, _ in KILLERS][:8]
    steps = len(killers)
    with serving(NetConfig(step_timeout_s=10, join_timeout_s=10), steps=steps,
                 interval=steps) as live:
        evil, honest = live.welcomed(0, 1)
        good = remote(honest)
        for t, header in enumerate(killers):
            evil.send("acts", t, _raw(header))
            assert f"client 0, round {t}" in _refusal(evil)
            assert live.thread.is_alive(), f"the server died on {header!r:.60}"
            _honest_round(live, good, t, 200 + t)
        assert not live.errors
        assert _equal(_state(live.server), _state(live.reference))


def test_huge_finite_activations_are_refused_before_they_reach_the_server():
    with serving(NetConfig(step_timeout_s=10, join_timeout_s=10), steps=2, interval=2) as live:
        _poison_two_rounds(live, r"magnitude 3e\+38, beyond the bound", 300)
        assert not live.errors
        assert _equal(_state(live.server), _state(live.reference))


def test_a_step_whose_result_is_not_finite_is_undone_and_never_checkpointed(tmp_path):
    # A bound as loose as fp32 allows: 3e38 passes validation, and the step must catch it.
    net = NetConfig(step_timeout_s=10, join_timeout_s=10, max_activation=3.4e38)
    with serving(net, steps=2, interval=2) as live:
        live.coordinator.checkpoint = tmp_path / "server.pt"
        _poison_two_rounds(live, "the step was undone", 400)
        live.remote_fed(1).aggregate(1, lora_state(live.client_segment), 11)
        live.thread.join(10)
        assert not live.errors
        assert _equal(_state(live.server), _state(live.reference))
        saved = load_checkpoint(tmp_path / "server.pt")["server"]
        for group in saved["groups"]:
            assert all(torch.isfinite(v).all() for v in group["adapter"].values())


def test_a_stall_in_an_aggregation_round_keeps_earlier_uploads_and_records_the_truth():
    """Client 0 steps and uploads its adapter at once; client 1 stalls past the step
    timeout; client 2 steps late and never uploads. The round opens long after client 0's
    upload arrived: it must still count, and the metrics must name exactly who was
    aggregated (client 0 alone, as the fed server forced the round without client 2)."""
    net = NetConfig(step_timeout_s=1.0, join_timeout_s=10)
    with serving(net, num_clients=3, steps=1, interval=1) as live:
        links = live.welcomed(0, 1, 2)
        adapter = lora_state(live.client_segment)
        remote(links[0]).step(0, activations(1))
        merged: dict = {}
        upload = threading.Thread(target=lambda: merged.update(
            live.remote_fed(0).aggregate(0, adapter, 10)))
        upload.start()
        time.sleep(1.5)  # client 1 is dropped after 1 s; client 2 then sends late
        remote(links[2]).step(2, activations(2))
        upload.join(15)
        assert not live.errors, live.errors
        assert _equal(merged, adapter)  # client 0's own adapter: it was aggregated alone
        live.thread.join(15)
        assert not live.errors
        events = [r for r in live.coordinator.rec.records if r.get("event") == "aggregate"]
        assert [e["clients"] for e in events] == [[0]]
        assert live.fed.aggregated(0) == [0]


def test_claimed_sample_counts_must_match_the_shard_in_the_hello_and_at_the_fed_server():
    with serving(NetConfig(step_timeout_s=1, join_timeout_s=2)) as live:
        hello = pb.Hello(client_id=1, cut=2, num_samples=10**6, codec="none", mode="splitlora")
        greedy = Link(live.address, live.net, hello, None)
        with pytest.raises(Refused, match="client 1 claims 1000000 samples but its shard of "
                                          "this run holds 11"):
            greedy.welcome(5)
        greedy.close()
        fed = live.remote_fed(1)
        adapter = lora_state(live.client_segment)
        with pytest.raises(Refused, match="claims 500 samples but its shard"):
            fed.aggregate(0, adapter, 500)
        key = next(iter(adapter))
        huge = {**adapter, key: torch.full_like(adapter[key], 3e38)}
        with pytest.raises(Refused, match=r"magnitude 3e\+38, beyond the bound"):
            fed.aggregate(0, huge, 11)
        fed.close()
