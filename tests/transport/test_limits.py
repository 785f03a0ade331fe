"""Resources a hostile or faulty party can hold on the main server are bounded.

Each test reproduces an attack of issue 15 against a live server (hello-less streams, an
upload flood, a silent adapter upload, a client that keeps stalling) and checks that the
honest client still trains, refusals come at once, and memory stays flat.
"""

from __future__ import annotations

import threading
import time

import grpc

from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport import hsplitlora_pb2_grpc as pb_grpc
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.security import ConnectionFailed, call_metadata, open_channel
from hsplitlora.transport.wire import frames
from tests.transport.harness import wait_for
from tests.transport.live import activations, remote, start_live

TOKENS = {"0": "tok-0", "1": "tok-1"}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class _Stream:
    """A raw Train call that sends ``frames`` (lazily) and then holds the stream open."""

    def __init__(self, address, net, party, token, frames_=()):
        self.release = threading.Event()
        self.code = None
        self.details = ""
        self.done = threading.Event()
        self._channel = open_channel(address, net)

        def requests():
            yield from frames_
            self.release.wait(60)

        call = pb_grpc.SplitTrainingStub(self._channel).Train(
            requests(), metadata=call_metadata(party, token))

        def watch():
            try:
                for _ in call:
                    pass
            except grpc.RpcError as e:
                self.code, self.details = e.code(), e.details()
            self.done.set()

        threading.Thread(target=watch, daemon=True).start()

    def close(self):
        self.release.set()
        self._channel.close()


def test_hello_less_streams_cannot_stop_training():
    net = NetConfig(step_timeout_s=10, join_timeout_s=1, min_clients=1, hello_timeout_s=1.5)
    live = start_live(net, steps=2, interval=2, tokens=TOKENS)
    streams = []
    try:
        # 14 authenticated streams of client 0 that never say hello (the pool used to be
        # 2n+8 = 12 workers, and the hello had no deadline)
        streams = [_Stream(live.address, net, "0", TOKENS["0"]) for _ in range(14)]
        time.sleep(0.5)
        refused = [s for s in streams if s.done.is_set()]
        assert len(refused) == 12
        assert all(s.code == grpc.StatusCode.RESOURCE_EXHAUSTED for s in refused)
        assert "already has 2 open Train calls" in refused[0].details
        # refusals of unauthenticated calls are still served, at once
        start = time.monotonic()
        outsider = _Stream(live.address, net, "1", "wrong")
        assert outsider.done.wait(2) and outsider.code == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - start < 2
        # the honest client trains
        honest = live.link(1, token=TOKENS["1"])
        assert honest.welcome(5).round == 0
        good = remote(honest)
        for t in range(2):
            good.round = t
            upload = activations(50 + t)
            assert good.step(1, upload).loss == live.reference.step(1, upload).loss
        # the two held streams are closed once their hello is overdue
        for s in streams:
            assert s.done.wait(5)
        held = [s for s in streams if s.code == grpc.StatusCode.DEADLINE_EXCEEDED]
        assert len(held) == 2 and "no hello within net.hello_timeout_s=1.5 s" in held[0].details
        outsider.close()
    finally:
        for s in streams:
            s.close()
        live.stop()


def test_a_flood_of_complete_uploads_is_cut_off_and_memory_stays_flat():
    net = NetConfig(step_timeout_s=10, join_timeout_s=10, max_tensor_mb=8)
    live = start_live(net, steps=1, interval=1)
    try:
        honest = live.link(1)
        junk = b"\x07" * (4 << 20)  # 4 MB that is no safetensors blob

        def flood():
            yield pb.ClientFrame(hello=pb.Hello(client_id=0, cut=2, num_samples=10,
                                                codec="none", mode="splitlora"))
            for seq in range(250):
                for f in frames(junk, "acts", 0, seq, net.chunk_bytes):
                    yield pb.ClientFrame(chunk=f)

        before = _rss_mb()
        attacker = _Stream(live.address, net, "0", None, flood())
        honest.welcome(5)
        assert attacker.done.wait(30), "the flood was never cut off"
        assert attacker.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "sent a message while 1 were still waiting" in attacker.details
        grown = _rss_mb() - before
        assert grown < 100, f"the server grew by {grown:.0f} MB"
        upload = activations(9)
        assert remote(honest).step(1, upload).loss == live.reference.step(1, upload).loss
        attacker.close()
    finally:
        live.stop()


def test_uploads_larger_than_one_batch_are_refused_by_default():
    live = start_live(NetConfig(step_timeout_s=10, join_timeout_s=10), steps=1, interval=1)
    try:
        evil, honest = live.link(0), live.link(1)
        evil.welcome(5)
        honest.welcome(5)
        limit = live.coordinator.upload_limit("none")
        assert limit < 1 << 20  # one batch of the tiny model, not 2 GB
        evil.send("acts", 0, b"\0" * (limit + 1))
        got = evil.receive(10)
        assert isinstance(got, pb.Control) and got.kind == pb.Control.REFUSED
        assert f"exceeds the limit of {limit} bytes" in got.message
    finally:
        live.stop()


def test_a_silent_adapter_upload_is_closed_after_the_step_timeout():
    live = start_live(NetConfig(step_timeout_s=1, join_timeout_s=10), steps=1, interval=1)
    channel = open_channel(live.address, live.net)
    try:
        hold = threading.Event()

        def nothing():
            hold.wait(30)
            yield from ()

        stub = pb_grpc.FederationStub(channel)
        start = time.monotonic()
        try:
            list(stub.Aggregate(nothing(), metadata=call_metadata("0", None), timeout=20))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "did not arrive within 1 s" in e.details()
        else:
            raise AssertionError("the silent upload was never closed")
        assert time.monotonic() - start < 5
        hold.set()
    finally:
        channel.close()
        live.stop()


def test_a_client_that_keeps_timing_out_is_backed_off():
    net = NetConfig(step_timeout_s=0.5, join_timeout_s=10)
    live = start_live(net, steps=6, interval=6)
    try:
        honest = live.link(1)
        good = remote(honest)
        staller = live.link(0)
        assert honest.welcome(5).round == staller.welcome(5).round == 0
        welcomes = []
        for t in range(6):
            if t in (0, 1):  # the staller says nothing, is dropped, and reconnects at once
                try:
                    staller.receive(5)
                except ConnectionFailed as e:
                    assert f"no activations for round {t}" in str(e)
                staller.close()
                staller = live.link(0)
                wait_for(lambda: 0 in live.coordinator._pending, 10, "the reconnection")
            good.round = t
            good.step(1, activations(t))
            if t == 0:
                welcomes.append(staller.welcome(5).round)
        welcomes.append(staller.welcome(5).round)
        # after its second timeout in a row (round 1) it sits out rounds 2 and 3
        assert welcomes == [1, 4]
        staller.close()
    finally:
        live.stop()
