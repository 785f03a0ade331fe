"""Resources a hostile or faulty party can hold on the main server are bounded.

Each test reproduces an attack of issue 15 against a live server (hello-less streams, an
upload flood, a silent adapter upload, a client that keeps stalling) and checks that the
honest client still trains, refusals come at once, and memory stays flat.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager

import grpc

from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport import hsplitlora_pb2_grpc as pb_grpc
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.limits import RETRY_AFTER_KEY, RateLimiter, Throttle, peer_address
from hsplitlora.transport.security import (
    ConnectionFailed,
    call_metadata,
    explain,
    open_channel,
)
from hsplitlora.transport.wire import frames
from tests.transport.harness import wait_for
from tests.transport.live import activations, remote, serving

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
        self.trailers: dict = {}
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
                self.trailers = dict(e.trailing_metadata() or ())
            self.done.set()

        threading.Thread(target=watch, daemon=True).start()

    def close(self):
        self.release.set()
        self._channel.close()


@contextmanager
def _streams() -> Iterator[list[_Stream]]:
    """A list for the test's _Streams; each is closed when the block ends."""
    streams: list[_Stream] = []
    try:
        yield streams
    finally:
        for s in streams:
            s.close()


def test_hello_less_streams_cannot_stop_training():
    net = NetConfig(step_timeout_s=10, join_timeout_s=1, min_clients=1, hello_timeout_s=1.5)
    with serving(net, steps=2, interval=2, tokens=TOKENS) as live, _streams() as streams:
        # 14 authenticated streams of client 0 that never say hello (the pool used to be
        # 2n+8 = 12 workers, and the hello had no deadline)
        streams.extend(_Stream(live.address, net, "0", TOKENS["0"]) for _ in range(14))
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


def test_a_flood_of_complete_uploads_is_cut_off_and_memory_stays_flat():
    net = NetConfig(step_timeout_s=10, join_timeout_s=10, max_tensor_mb=8)
    with serving(net, steps=1, interval=1) as live:
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


def test_uploads_larger_than_one_batch_are_refused_by_default():
    with serving(NetConfig(step_timeout_s=1, join_timeout_s=10), steps=1, interval=1) as live:
        evil, honest = live.welcomed(0, 1)
        limit = live.coordinator.upload_limit("none")
        assert limit < 1 << 20  # one batch of the tiny model, not 2 GB
        evil.send("acts", 0, b"\0" * (limit + 1))
        got = evil.receive(10)
        assert isinstance(got, pb.Control) and got.kind == pb.Control.REFUSED
        assert f"exceeds the limit of {limit} bytes" in got.message


def test_a_silent_adapter_upload_is_closed_after_the_step_timeout():
    with (serving(NetConfig(step_timeout_s=1, join_timeout_s=1), steps=1, interval=1) as live,
          closing(open_channel(live.address, live.net)) as channel):
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


def _welcomes_after_two_failed_rounds(net: NetConfig, fail) -> list[int]:
    """Client 0 fails rounds 0 and 1 (``fail(link, round)``), reconnecting at once each
    time, while client 1 steps every round; the rounds client 0 is welcomed at."""
    with serving(net, steps=6, interval=6) as live:
        honest = live.link(1)
        good = remote(honest)
        bad = live.link(0)
        assert honest.welcome(5).round == bad.welcome(5).round == 0
        welcomes = []
        for t in range(6):
            if t in (0, 1):
                fail(bad, t)
                bad.close()
                bad = live.link(0)
                wait_for(lambda: 0 in live.coordinator._pending, 10, "the reconnection")
            good.round = t
            good.step(1, activations(t))
            if t == 0:
                welcomes.append(bad.welcome(5).round)
        welcomes.append(bad.welcome(5).round)
        bad.close()
        return welcomes


def test_a_client_that_keeps_timing_out_is_backed_off():
    def stall(link, t):  # the staller says nothing and is dropped
        try:
            link.receive(5)
        except ConnectionFailed as e:
            assert f"no activations for round {t}" in str(e)

    welcomes = _welcomes_after_two_failed_rounds(
        NetConfig(step_timeout_s=0.5, join_timeout_s=10), stall)
    # after its second timeout in a row (round 1) it sits out rounds 2 and 3
    assert welcomes == [1, 4]


def test_a_client_that_reconnects_after_refused_uploads_is_backed_off():
    """A compromised client whose junk is refused and who comes back on a new connection
    (a flood's stream is cut) would be admitted, and waited for in id order, every round;
    after its second refusal in a row it sits out two rounds, as a client that keeps
    timing out does. (Connected, a refused client is still served each round.)"""
    def junk(link, t):
        link.send("acts", t, b"junk")
        got = link.receive(5)
        assert isinstance(got, pb.Control) and got.kind == pb.Control.REFUSED

    welcomes = _welcomes_after_two_failed_rounds(
        NetConfig(step_timeout_s=5, join_timeout_s=10), junk)
    assert welcomes == [1, 4]  # after its second refusal it sat out rounds 2 and 3


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limiter_is_a_token_bucket_per_address():
    clock = _Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    burst = [limiter.allow("ipv4:10.0.0.1") for _ in range(5)]
    assert burst[:3] == [0.0, 0.0, 0.0] and burst[3] == burst[4] == 0.5  # 1 token / 2 per s
    assert limiter.allow("ipv4:10.0.0.2") == 0.0  # another address has its own bucket
    clock.now += 0.5
    assert limiter.allow("ipv4:10.0.0.1") == 0.0 and limiter.allow("ipv4:10.0.0.1") > 0
    clock.now += 100  # refilled, never past the burst
    assert [limiter.allow("ipv4:10.0.0.1") for _ in range(4)].count(0.0) == 3
    small = RateLimiter(rate=1.0, burst=1, clock=clock, max_keys=2)
    for i in range(3):
        small.allow(f"a{i}")
    clock.now += 1.0
    small.allow("a3")  # past max_keys: the buckets that filled up again are forgotten
    assert len(small._buckets) <= 2
    assert peer_address("ipv4:127.0.0.1:50123") == "ipv4:127.0.0.1"
    assert peer_address("ipv6:[::1]:50123") == "ipv6:[::1]"
    assert peer_address("unix:/tmp/s") == "unix:/tmp/s"
    log = Throttle(60.0, clock)
    assert [log.due("x"), log.due("x"), log.due("y")] == [True, False, True]
    clock.now += 60
    assert log.due("x")


def test_a_burst_of_calls_from_one_address_is_refused_while_others_are_served(caplog):
    """The cap is per address: past the burst, new calls from 127.0.0.1 are refused with
    RESOURCE_EXHAUSTED and a retry-after (which the client turns into a retry), logged
    once; the honest client's open stream keeps training, and a call from another
    address (::1) still reaches the server. The rate is so low that no token comes back
    during the test, so the count is exact."""
    net = NetConfig(step_timeout_s=10, join_timeout_s=1, min_clients=1, peer_calls_per_s=0.001,
                    peer_call_burst=4)
    with (serving(net, steps=2, interval=2, tokens=TOKENS, bind_to="[::]:0") as live,
          _streams() as streams):
        honest = live.link(1, token=TOKENS["1"])  # call 1 of 127.0.0.1's burst
        assert honest.welcome(5).round == 0
        with caplog.at_level("WARNING", logger="hsplitlora.transport.limits"):
            streams.extend(_Stream(live.address, net, "1", "wrong") for _ in range(8))
            for s in streams:
                assert s.done.wait(5)
        # the 8 streams open in parallel, so which 3 fit the burst is the scheduler's say
        codes = [s.code for s in streams]
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 3  # within the burst
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 5
        refused = next(s for s in streams if s.code == grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "too many new calls from ipv4:127.0.0.1" in refused.details
        assert "net.peer_calls_per_s" in refused.details
        assert int(refused.trailers[RETRY_AFTER_KEY]) > 0
        assert sum("too many new calls" in r.getMessage() for r in caplog.records) == 1
        flood = grpc.RpcError()
        flood.code = lambda: grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[method-assign]
        flood.details = lambda: refused.details  # type: ignore[method-assign]
        flood.trailing_metadata = lambda: tuple(refused.trailers.items())  # type: ignore
        assert isinstance(explain(flood, live.address, net), ConnectionFailed)  # retried
        other = _Stream(f"[::1]:{live.port}", net, "1", "wrong")
        assert other.done.wait(5) and other.code == grpc.StatusCode.UNAUTHENTICATED
        good = remote(honest)
        for t in range(2):
            good.round = t
            upload = activations(70 + t)
            assert good.step(1, upload).loss == live.reference.step(1, upload).loss
        other.close()
