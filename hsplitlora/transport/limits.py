"""Per-party bounds on what a peer can hold on a server: streams, waits, bytes and rates.

gRPC's synchronous server gives every open call a worker thread, so a peer that opens
calls and sends nothing can starve everyone (a hello-less stream used to hold its worker
forever). :class:`StreamGate` caps the open calls of each party and of each service, so
the training stream and the federation calls each keep their own workers; calls past a
cap are refused at once. :class:`PeerRateLimit` caps how fast one network address may
open calls, before anything of theirs is read. :func:`deadline_reader` turns "wait for
the next message" into a wait with a deadline.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

import grpc

from hsplitlora.transport.config import NetConfig

__all__ = ["RETRY_AFTER_KEY", "Backoff", "PeerRateLimit", "RateLimiter", "StreamGate", "Throttle",
           "Ticket", "deadline_reader", "first_within", "peer_address",
           "peer_rate_limit"]

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "x-hsplitlora-retry-after-ms"  # trailer of a rate refusal: try again then

T = TypeVar("T")
_DONE = object()


class Ticket:
    """One admitted call; :meth:`release` (idempotent) gives its place back."""

    def __init__(self, gate: StreamGate, key: tuple[str, str]) -> None:
        self._gate, self._key, self._held = gate, key, True

    def release(self) -> None:
        with self._gate._lock:
            if self._held:
                self._held = False
                self._gate._open[self._key] -= 1
                self._gate._total[self._key[0]] -= 1


class StreamGate:
    """Open calls per (service, party) at most ``per_party`` and per service at most
    ``per_service``; what does not fit is refused, never queued."""

    def __init__(self, per_party: dict[str, int], per_service: dict[str, int]) -> None:
        self.per_party = per_party  # service -> cap for one party
        self.per_service = per_service  # service -> cap for all parties together
        self._open: dict[tuple[str, str], int] = {}
        self._total: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def workers(self) -> int:
        """Threads the server needs so every admitted call has one, and refusals too."""
        return sum(self.per_service.values()) + 8

    def enter(self, service: str, party: str) -> Ticket | str:
        """A ticket, or the reason the call is refused."""
        key = (service, party)
        with self._lock:
            mine, total = self._open.get(key, 0), self._total.get(service, 0)
            if mine >= self.per_party[service]:
                return (f"party {party!r} already has {mine} open {service} calls, the most "
                        "one party may hold; close the others (or wait for them to time out)")
            if total >= self.per_service[service]:
                return f"the server already serves {total} {service} calls, its limit"
            self._open[key], self._total[service] = mine + 1, total + 1
        return Ticket(self, key)


def first_within(requests: Iterator[T], timeout_s: float) -> T | None | TimeoutError:
    """The first item of ``requests`` (None if it ends first), or a TimeoutError if none
    comes within ``timeout_s``. A helper thread does the blocking read; it ends when the
    call does."""
    box: queue.Queue[object] = queue.Queue(1)

    def read() -> None:
        try:
            box.put(next(requests, None))
        except Exception as e:  # the call was cancelled: nothing to hand over
            box.put(e)

    threading.Thread(target=read, name="first-frame", daemon=True).start()
    try:
        got = box.get(timeout=timeout_s)
    except queue.Empty:
        return TimeoutError(f"nothing arrived within {timeout_s:g} s")
    if isinstance(got, Exception):
        return None
    return got  # type: ignore[return-value]


def deadline_reader(requests: Iterator[T], timeout_s: float) -> Iterator[T]:
    """``requests``, raising TimeoutError when the next item takes over ``timeout_s``."""
    box: queue.Queue[object] = queue.Queue(2)  # bounded: the reader waits for us

    def pump() -> None:
        try:
            for item in requests:
                box.put(item)
        except Exception:
            pass  # cancelled or broken: the consumer sees the end
        box.put(_DONE)

    threading.Thread(target=pump, name="deadline-reader", daemon=True).start()
    while True:
        try:
            item = box.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"the next message did not arrive within {timeout_s:g} s") \
                from None
        if item is _DONE:
            return
        yield item  # type: ignore[misc]


class Backoff:
    """Rounds a client sits out for failing its steps again and again (timing out, or
    sending uploads that are refused): after its second failure in a row, 2, then 4, 8...
    rounds (at most 64) before it is admitted again, so a stalling or hostile client, each
    new connection of which a round would wait for, cannot cost every round. Strikes
    outlive reconnections; a step that goes through clears them."""

    def __init__(self) -> None:
        self.strikes: dict[int, int] = {}  # failed steps in a row, per client
        self.until: dict[int, int] = {}  # first round a struck client may rejoin

    def strike(self, cid: int, round: int) -> None:
        strikes = self.strikes.get(cid, 0) + 1
        self.strikes[cid] = strikes
        if strikes >= 2:
            self.until[cid] = round + 1 + min(2 ** (strikes - 1), 64)

    def clear(self, cid: int) -> None:
        self.strikes.pop(cid, None)

    def ready(self, cid: int, round: int) -> bool:
        """Whether client ``cid`` may be admitted at ``round``."""
        return self.until.get(cid, -1) <= round

    def explain(self, cid: int) -> str:
        return (f"client {cid} waits until round {self.until[cid]}: it failed "
                f"{self.strikes.get(cid, 0)} steps in a row")


class Throttle:
    """Says whether a message about ``key`` is due (at most once per ``every_s``), so a
    flood of refusals cannot flood the log."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._last: dict[Any, float] = {}
        self._lock = threading.Lock()

    def due(self, key: Any) -> bool:
        now = self._clock()
        with self._lock:
            if now - self._last.get(key, -self.every_s) < self.every_s:
                return False
            self._last[key] = now
            return True


class RateLimiter:
    """A token bucket per key: ``burst`` calls at once, then ``rate`` per second.

    Buckets that have filled up again are forgotten once more than ``max_keys`` are held,
    so many addresses cost memory only while they are busy."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 4096) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def allow(self, key: Hashable) -> float:
        """0 if a call of ``key`` may go ahead now (and count it), else the seconds until
        one may."""
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._forget(now)
            return 0.0

    def _forget(self, now: float) -> None:
        full = self.burst / self.rate  # seconds an empty bucket takes to fill
        for key in [k for k, (_, when) in self._buckets.items() if now - when >= full]:
            del self._buckets[key]


def peer_address(peer: str) -> str:
    """The network address of a gRPC peer string, without the port
    (``ipv4:10.0.0.5:51234`` -> ``ipv4:10.0.0.5``, ``ipv6:[::1]:5`` -> ``ipv6:[::1]``)."""
    head, sep, port = peer.rpartition(":")
    return head if sep and port.isdigit() and ":" in head else peer


class PeerRateLimit(grpc.ServerInterceptor):
    """Refuses new calls from a network address past ``net.peer_calls_per_s`` (after a
    burst of ``net.peer_call_burst``) with ``RESOURCE_EXHAUSTED`` and a retry-after
    trailer, before authentication or any request is read: a peer that reconnects in a
    loop then costs the server one cheap refusal per call, and never its step time.
    Refusals are logged once per ``log_every_s`` per address, not per call."""

    def __init__(self, limiter: RateLimiter, log_every_s: float = 60.0) -> None:
        self.limiter = limiter
        self._log = Throttle(log_every_s, limiter._clock)

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        # The peer's address is only known to the call's context: check it there, first.
        kind = {(False, False): "unary_unary", (False, True): "unary_stream",
                (True, False): "stream_unary", (True, True): "stream_stream"}[
            (handler.request_streaming, handler.response_streaming)]
        behavior = getattr(handler, kind)
        method = handler_call_details.method

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            self.check(context, method)
            return behavior(request, context)

        return getattr(grpc, f"{kind}_rpc_method_handler")(
            checked, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def check(self, context: grpc.ServicerContext, method: str = "") -> None:
        """Let the call go on, or abort it (the caller's address is over its rate)."""
        address = peer_address(context.peer())
        wait = self.limiter.allow(address)
        if not wait:
            return
        reason = (f"too many new calls from {address}: more than "
                  f"{self.limiter.rate:g} per second (net.peer_calls_per_s, after a burst of "
                  f"net.peer_call_burst={self.limiter.burst}); retry in {wait:.2f} s")
        if self._log.due(address):
            log.warning("refused a %s call: %s (further refusals of this address are logged "
                        "once every %g s)", method or "new", reason, self._log.every_s)
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(int(wait * 1000) + 1)),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)


def peer_rate_limit(net: NetConfig, clock: Callable[[], float] = time.monotonic
                    ) -> PeerRateLimit:
    """The per-address call rate limit of a server of this deployment."""
    return PeerRateLimit(RateLimiter(net.peer_calls_per_s, net.peer_call_burst, clock))
