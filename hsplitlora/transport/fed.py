"""The fed server behind gRPC: a per-round rendezvous around the :class:`FedServer` role.

Clients upload their adapter after an aggregation round and block until the round's
aggregate exists. The main server says which clients finished the round (``open``), and
says it again with fewer when one leaves, so a departed client never holds the others
up; one that is expected but silent past ``timeout_s`` is left out. Either way FedAvg's
weights renormalise over the clients present, and states are always combined in client-id
order, which is what makes a networked run bit-identical to the in-process one.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from hsplitlora.checkpoint import atomic_save
from hsplitlora.roles.fedserver import FedServer
from hsplitlora.roles.messages import nbytes
from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport import hsplitlora_pb2_grpc as pb_grpc
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.hetero_fed import combine_call
from hsplitlora.transport.limits import StreamGate, Ticket, deadline_reader
from hsplitlora.transport.plan import layout_bytes, samples_problem
from hsplitlora.transport.rounds import opened_round
from hsplitlora.transport.security import Authenticator, call_metadata, explain, open_channel
from hsplitlora.transport.validate import Layout, check_finite, check_header, check_magnitude
from hsplitlora.transport.wire import Reassembler, WireError, frames, pack, read_header, unpack

__all__ = ["FedService", "FederationServicer", "RemoteFed", "adapter_layout", "round_timeout"]

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def adapter_layout(state: Mapping[str, torch.Tensor]) -> Layout:
    """The exact names, dtypes and shapes an adapter upload must have."""
    return {k: ("F32", tuple(v.shape)) for k, v in state.items()}


def round_timeout(net: NetConfig, num_clients: int) -> float:
    """How long an aggregation round may take to open: the main server serves its clients
    one after another, each up to ``net.step_timeout_s``, so a client served early waits
    for every later one (and a stalled one) before the round is opened."""
    return net.step_timeout_s * (num_clients + 1)


def _decode_adapter(data: bytes, layout: Layout, what: str,
                    bound: float = math.inf) -> tuple[State, dict[str, str]]:
    try:
        header = read_header(data)
    except WireError as e:
        raise WireError(f"{what}: {e}") from None
    check_header(header, layout, {}, what)
    tensors = unpack(data)
    check_finite(tensors, what)
    check_magnitude(tensors, bound, what)
    return tensors, header.meta


@dataclass
class _Round:
    expected: set[int]
    opened: float
    received: dict[int, tuple[State, int]] = field(default_factory=dict)
    done: bool = False
    blob: bytes | None = None  # the packed aggregate, sent to every client of the round
    aggregated: list[int] = field(default_factory=list)  # whose adapters the blob holds
    # tensor bytes each client uploaded, and that the aggregate sends back to each
    uploaded: dict[int, int] = field(default_factory=dict)
    sent: int = 0


class FedService:
    """Thread-safe aggregation rounds over a :class:`FedServer` (one per process)."""

    def __init__(self, fed: FedServer, layout: Layout, timeout_s: float, *,
                 checkpoint: Path | None = None, open_timeout_s: float | None = None,
                 samples: tuple[int, ...] = (), bound: float = math.inf) -> None:
        self.fed = fed
        self.layout = layout
        self.timeout_s = timeout_s
        # An upload may come long before its round opens (see round_timeout).
        self.open_timeout_s = timeout_s if open_timeout_s is None else open_timeout_s
        self.samples = samples  # each client's shard size, to check what uploads claim
        self.bound = bound  # largest |value| an adapter may hold
        self.checkpoint = checkpoint  # a fed server in its own process saves itself
        self.latest_round = -1
        self._blob: bytes | None = None
        self._rounds: dict[int, _Round] = {}
        self._cond = threading.Condition()

    def layout_for(self, round: int, client_id: int) -> Layout:
        """The adapter every client uploads: the same in every round."""
        return self.layout

    def open(self, round: int, client_ids: Sequence[int]) -> None:
        """Declare (or shrink) the clients that take part in ``round``'s aggregation."""
        with self._cond:
            r = self._rounds.get(round)
            if r is None:
                self._rounds[round] = _Round(set(client_ids), time.monotonic())
            elif not r.done:
                r.expected &= set(client_ids)
                self._maybe_finish(round, r, force=False)
            self._cond.notify_all()

    def submit(self, round: int, client_id: int, state: State, num_samples: int) -> bytes:
        """Add one client's adapter; block until the round's aggregate exists; return it
        packed. Raises ``LookupError`` when the client has no part in this round."""
        with self._cond:
            r = opened_round(self._cond, self._rounds, round, self.open_timeout_s)
            if r.done or client_id not in r.expected:
                raise LookupError(f"client {client_id} has no part in aggregation round {round}"
                                  " (it did not finish that round, or the round is over)")
            r.received[client_id] = (state, num_samples)
            r.uploaded[client_id] = nbytes(state)
            self._maybe_finish(round, r, force=False)
            self._wait_done(round, r)
            if r.blob is None:
                raise LookupError(f"aggregation round {round} ended without an aggregate")
            return r.blob

    def wait(self, round: int, timeout: float) -> bool:
        """Wait up to ``timeout`` for ``round`` to finish (forcing it once overdue)."""
        end = time.monotonic() + timeout
        with self._cond:
            r = self._rounds.get(round)
            while r is not None and not r.done and time.monotonic() < end:
                if time.monotonic() >= r.opened + self.timeout_s:
                    self._maybe_finish(round, r, force=True)
                    break
                self._cond.wait(min(end, r.opened + self.timeout_s) - time.monotonic())
            return r is not None and r.done

    def aggregated(self, round: int) -> list[int] | None:
        """The clients whose adapters ``round``'s aggregate holds (None: not finished)."""
        with self._cond:
            r = self._rounds.get(round)
            return list(r.aggregated) if r is not None and r.done else None

    def links(self, round: int) -> list[list[int]]:
        """Per client of ``round``'s aggregate ``[id, bytes up, bytes down]``: the adapter
        tensors it uploaded and the aggregate it got back, for the run's records (the
        same figures an in-process run records)."""
        with self._cond:
            r = self._rounds.get(round)
            if r is None or not r.done:
                return []
            return [[cid, r.uploaded[cid], r.sent] for cid in r.aggregated]

    def latest(self, min_round: int, wait_s: float) -> tuple[int, bytes] | None:
        """The newest aggregate if its round is at least ``min_round`` (waiting for it)."""
        end = time.monotonic() + wait_s
        with self._cond:
            while self.latest_round < min_round and time.monotonic() < end:
                self._cond.wait(end - time.monotonic())
            if self._blob is None or self.latest_round < min_round:
                return None
            return self.latest_round, self._blob

    def _wait_done(self, round: int, r: _Round) -> None:
        while not r.done:
            remaining = r.opened + self.timeout_s - time.monotonic()
            if remaining <= 0:
                self._maybe_finish(round, r, force=True)
            else:
                self._cond.wait(remaining)

    def _maybe_finish(self, round: int, r: _Round, *, force: bool) -> None:
        if r.done or not (force or set(r.received) >= r.expected):
            return
        r.done = True
        ids = sorted(r.received)
        late = sorted(r.expected - set(r.received))
        if late:
            log.warning("aggregation round %d: no adapter from client(s) %s within %g s; "
                        "aggregating the %d present", round, late, self.timeout_s, len(ids))
        if ids:
            states = [r.received[i][0] for i in ids]
            merged = self.fed.aggregate(states, [r.received[i][1] for i in ids])
            bad = [k for k, v in merged.items() if not bool(torch.isfinite(v).all())]
            if bad:  # cannot happen within the bound; never hand it out if it does
                log.error("aggregation round %d: the aggregate of clients %s is not finite "
                          "(%s); the round gives no aggregate", round, ids, bad[0])
                ids = []
        if ids:
            r.aggregated, r.sent = ids, nbytes(merged)
            r.blob = pack(merged, {"round": str(round), "clients": ",".join(map(str, ids))})
            self._blob, self.latest_round = r.blob, round
            log.info("aggregation round %d: clients %s", round, ids)
            if self.checkpoint is not None:
                atomic_save(self.state_dict(), self.checkpoint)
        r.received.clear()  # the states are no longer needed; keep memory flat
        for old in [k for k in self._rounds if k < round - 2]:
            del self._rounds[old]
        self._cond.notify_all()

    def state_dict(self) -> dict[str, Any]:
        with self._cond:
            return {"latest_round": self.latest_round, "blob": self._blob,
                    "rounds": self.fed.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with self._cond:
            self.latest_round = int(state["latest_round"])
            self._blob = state["blob"]
            self.fed.rounds = int(state["rounds"])
            if self._blob is not None:
                self.fed.latest = unpack(self._blob)

    def latest_state(self) -> State | None:
        with self._cond:
            return unpack(self._blob) if self._blob is not None else None


class FederationServicer(pb_grpc.FederationServicer):
    """gRPC face of a :class:`FedService` (or, in the heterogeneous modes, a
    :class:`~hsplitlora.transport.hetero_fed.HeteroFedService`); clients aggregate, the
    main server opens rounds (and, heterogeneous, sends its side of each)."""

    def __init__(self, service: Any, auth: Authenticator, net: NetConfig,
                 gate: StreamGate | None = None) -> None:
        self.service = service
        self.auth = auth
        self.net = net
        self.gate = gate  # caps the calls each party holds open (see limits.StreamGate)

    def _admit(self, party: str, context: grpc.ServicerContext) -> None:
        if self.gate is None:
            return
        got = self.gate.enter("Federation", party)
        if isinstance(got, str):
            log.warning("refused a federation call from %s: %s", context.peer(), got)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, got)
        assert isinstance(got, Ticket)
        context.add_callback(got.release)  # the call is over, however it ended

    def _client(self, context: grpc.ServicerContext) -> int:
        party = self.auth.identify(context, "Aggregate")
        if party == "server":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "the main server does not upload "
                          "adapters")
        self._admit(party, context)
        return int(party)

    def _receive(self, requests: Iterator[pb.Chunk],
                 cid: int) -> tuple[int, State, int]:
        """One adapter upload: its round, the validated state and its sample count."""
        layout = getattr(self.service, "layout", None)
        widest = getattr(self.service, "upload_bytes", None)  # heterogeneous: the widest
        limit = (self.net.tensor_limit(layout_bytes(layout)) if layout is not None
                 else self.net.tensor_limit(widest) if widest is not None
                 else self.net.max_tensor_bytes)
        assembler = Reassembler(limit)
        what = f"adapter of client {cid}"
        # Every chunk must come within the step timeout: a silent upload holds a worker.
        for chunk in deadline_reader(requests, self.net.step_timeout_s):
            blob = assembler.feed(chunk)
            if blob is not None:
                break
        else:
            raise WireError(f"{what}: the call ended before a whole adapter arrived")
        what = f"{what}, round {blob.round}"
        if blob.kind != "adapter":
            raise WireError(f"{what}: got a {blob.kind!r} blob instead")
        state, meta = _decode_adapter(blob.data, self.service.layout_for(blob.round, cid), what,
                                      getattr(self.service, "bound", math.inf))
        text = meta.get("num_samples", "")
        num_samples = int(text) if text.isdigit() and len(text) < 19 else 0
        if num_samples < 1:
            raise WireError(f"{what}: metadata num_samples must be a positive integer")
        problem = samples_problem(getattr(self.service, "samples", ()), cid, num_samples)
        if problem:
            raise WireError(f"{what}: {problem}")
        return blob.round, state, num_samples

    def Aggregate(self, request_iterator: Iterator[pb.Chunk],  # noqa: N802 (gRPC's name)
                  context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        cid = self._client(context)
        try:
            round, state, num_samples = self._receive(request_iterator, cid)
        except WireError as e:
            log.warning("refused an upload: %s", e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        except LookupError as e:
            log.warning("adapter of client %d: %s", cid, e)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            return
        except TimeoutError as e:
            log.warning("adapter of client %d: %s", cid, e)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"adapter of client {cid}: {e} "
                          f"(net.step_timeout_s)")
            return
        except grpc.RpcError:
            return  # the client went away mid-upload
        except Exception as e:  # a bug of ours that input trips is still only a refusal
            log.exception("adapter of client %d: unexpected failure while reading it", cid)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"adapter of client {cid} could "
                          f"not be read ({type(e).__name__}: {e})")
            return
        try:
            packed = self.service.submit(round, cid, state, num_samples)
        except LookupError as e:
            log.warning("adapter of client %d, round %d: %s", cid, round, e)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            return
        yield from frames(packed, "aggregate", round, 0, self.net.chunk_bytes)

    def Latest(self, request: pb.LatestRequest,  # noqa: N802
               context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        self._admit(self.auth.identify(context, "Latest"), context)
        found = self.service.latest(request.min_round, min(request.wait_s,
                                                           self.service.timeout_s))
        if found is not None:
            yield from frames(found[1], "aggregate", found[0], 0, self.net.chunk_bytes)

    def Open(self, request: pb.RoundOpen, context: grpc.ServicerContext) -> pb.Ack:  # noqa: N802
        self._main_server(context, "opens aggregation rounds", "Open")
        self.service.open(request.round, list(request.client_ids))
        return pb.Ack()

    def Combine(self, request_iterator: Iterator[pb.Chunk],  # noqa: N802
                context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        self._main_server(context, "sends its side of an aggregation", "Combine")
        yield from combine_call(self.service, request_iterator, self.net, context)

    def _main_server(self, context: grpc.ServicerContext, what: str, method: str) -> None:
        if self.auth.identify(context, method) != "server":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"only the main server {what}")
        self._admit("server", context)


class RemoteFed:
    """A fed server seen through gRPC, from a client (``party`` = its id) or from the main
    server (``party`` = ``"server"``)."""

    def __init__(self, address: str, net: NetConfig, party: str, token: str | None) -> None:
        self.address = address
        self.net = net
        self._channel = open_channel(address, net)
        self._stub = pb_grpc.FederationStub(self._channel)
        self._party, self._token = party, token

    def _meta(self, method: str) -> tuple[tuple[str, str], ...]:
        return call_metadata(self._party, self._token, method, self.net)

    def close(self) -> None:
        self._channel.close()

    def open(self, round: int, client_ids: Sequence[int]) -> None:
        try:
            self._stub.Open(pb.RoundOpen(round=round, client_ids=list(client_ids)),
                            metadata=self._meta("Open"), timeout=self.net.reply_timeout_s)
        except grpc.RpcError as e:
            raise explain(e, self.address, self.net) from None

    def _collect(self, stream: Iterator[pb.Chunk], layout: Layout,
                 what: str) -> tuple[int, State] | None:
        assembler = Reassembler(self.net.max_tensor_bytes)
        for chunk in stream:
            blob = assembler.feed(chunk)
            if blob is not None:
                state, _ = _decode_adapter(blob.data, layout, what)
                return blob.round, state
        return None

    def aggregate(self, round: int, state: Mapping[str, torch.Tensor],
                  num_samples: int, reply: Layout | None = None) -> State:
        """Upload ``state`` for ``round``; the round's aggregate (laid out as ``reply``,
        by default as ``state``)."""
        data = pack(state, {"num_samples": str(num_samples)})
        up = frames(data, "adapter", round, 0, self.net.chunk_bytes)
        layout = adapter_layout(state) if reply is None else reply
        try:
            got = self._collect(self._stub.Aggregate(up, metadata=self._meta("Aggregate"),
                                                     timeout=self.net.reply_timeout_s),
                                layout, f"aggregate of round {round}")
        except grpc.RpcError as e:
            raise explain(e, self.address, self.net) from None
        if got is None:
            raise WireError(f"the fed server at {self.address} sent no aggregate for round "
                            f"{round}")
        return got[1]

    def latest(self, like: Mapping[str, torch.Tensor], min_round: int,
               wait_s: float) -> tuple[int, State] | None:
        """The newest aggregate of round ``>= min_round`` (shaped ``like``), if any."""
        try:
            stream = self._stub.Latest(pb.LatestRequest(min_round=min_round, wait_s=wait_s),
                                       metadata=self._meta("Latest"),
                                       timeout=wait_s + self.net.reply_timeout_s)
            return self._collect(stream, adapter_layout(like), "latest aggregate")
        except grpc.RpcError as e:
            raise explain(e, self.address, self.net) from None
