"""Per-party bounds on what a peer can hold on a server: streams, waits and bytes.

gRPC's synchronous server gives every open call a worker thread, so a peer that opens
calls and sends nothing can starve everyone (a hello-less stream used to hold its worker
forever). :class:`StreamGate` caps the open calls of each party and of each service, so
the training stream and the federation calls each keep their own workers; calls past a
cap are refused at once. :func:`deadline_reader` turns "wait for the next message" into
a wait with a deadline.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

__all__ = ["StreamGate", "Ticket", "deadline_reader", "first_within"]

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
