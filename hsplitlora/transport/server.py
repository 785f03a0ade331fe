"""The main server behind gRPC: one stream per client, one coordinator that owns the role.

Each client's stream is read by its own thread into an inbox; only the coordinator thread
touches the :class:`MainServer`. Per round it serves the clients in client-id order, which
is the order of the in-process simulation: under SFL-V2 the shared server adapter then sees
exactly the same sequence of updates, so the run is bit-identical. Clients still compute in
parallel: a client's forward pass does not wait for the clients before it, only its
gradient does. A client that is late past ``net.step_timeout_s``, disconnects, or sends a
tensor that fails validation is left out of that round and the round goes on; new and
returning clients are admitted at round boundaries.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import torch

from hsplitlora.checkpoint import atomic_save
from hsplitlora.roles.fedserver import FedServer
from hsplitlora.roles.messages import Activations, ServerReply
from hsplitlora.roles.server import MainServer
from hsplitlora.train.recorder import Recorder
from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport import hsplitlora_pb2_grpc as pb_grpc
from hsplitlora.transport.codec import CODECS, decode, decode_activations, encode, wire_layout
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.fed import FederationServicer, FedService, RemoteFed
from hsplitlora.transport.guard import guarded_step
from hsplitlora.transport.limits import (
    Backoff,
    StreamGate,
    Throttle,
    Ticket,
    first_within,
    peer_rate_limit,
)
from hsplitlora.transport.plan import WirePlan
from hsplitlora.transport.security import Authenticator, bind, options
from hsplitlora.transport.validate import (
    check_activation_values,
    check_finite,
    check_header,
    check_magnitude,
    loss_meta,
)
from hsplitlora.transport.wire import (
    Blob,
    Header,
    Reassembler,
    WireError,
    frames,
    pack,
    read_header,
    unpack,
)

__all__ = ["GONE", "Admission", "Coordinator", "Session", "TrainingServicer", "admit",
           "decode_upload", "hello_problem", "listen", "stream_gate"]

log = logging.getLogger(__name__)

GONE = object()  # inbox: the client's stream ended
_END = object()  # outbox: finish the stream normally


@dataclass(frozen=True)
class _Abort:
    code: grpc.StatusCode
    message: str


class _Missed(Exception):  # noqa: N818 - control flow, not an error
    """A client left the round (timed out or went away); already dealt with."""


def decode_tail(blob: Blob, round: int, returned: torch.Tensor, codec: str, bound: float,
                what: str) -> ServerReply:
    """A U-shaped client's answer to the activations it was sent: the gradient at its tail
    (shaped as they were), with its loss and target tokens for the server's records."""
    if blob.kind != "tailgrad" or blob.round != round:
        raise WireError(f"{what}: got a {blob.kind!r} blob of round {blob.round} instead")
    header, grad = decode_tail_grad(blob.data, returned, codec, bound, what)
    return ServerReply(*loss_meta(header.meta, what), grad)


def decode_tail_grad(data: bytes, returned: torch.Tensor, codec: str, bound: float,
                     what: str) -> tuple[Header, torch.Tensor]:
    """The gradient at a U-shaped client's tail (a step's or a probe's), checked: the
    layout of ``returned`` (what it answers), finite, within the run's value bound."""
    header = read_header(data)
    check_header(header, wire_layout("tailgrad", codec, returned.dtype,
                                     tuple(returned.shape)), {}, what)
    wire = unpack(data)
    check_finite(wire, what)
    grad = decode(wire, "tailgrad", codec, returned.dtype)
    check_magnitude({"tailgrad": grad}, bound, what)
    return header, grad


class Session:
    """One client's open stream, seen from the coordinator."""

    def __init__(self, hello: pb.Hello, chunk_bytes: int) -> None:
        self.client_id = hello.client_id
        self.codec = hello.codec
        self.num_samples = hello.num_samples
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.outbox: queue.Queue[Any] = queue.Queue()
        self.gone = threading.Event()
        self._chunk_bytes = chunk_bytes
        self._seq = itertools.count()

    def send(self, kind: str, round: int, data: bytes) -> None:
        for f in frames(data, kind, round, next(self._seq), self._chunk_bytes):
            self.outbox.put(pb.ServerFrame(chunk=f))

    def control(self, kind: int, round: int, message: str = "") -> None:
        self.outbox.put(pb.ServerFrame(control=pb.Control(
            kind=kind, round=round, message=message)))  # type: ignore[arg-type]

    def end(self) -> None:
        self.outbox.put(_END)

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.gone.set()
        self.outbox.put(_Abort(code, message))
        self.inbox.put(GONE)


def hello_problem(party: str, frame: pb.ClientFrame, plan: WirePlan) -> str | None:
    """Why a stream's first frame cannot join a run of ``plan`` (None: it can). In the
    heterogeneous modes (``plan.cut == -1``) the server plans each cut; a client says -1."""
    if frame.WhichOneof("body") != "hello":
        return "the first frame of a stream must be a hello"
    h = frame.hello
    if str(h.client_id) != party:
        return f"hello says client {h.client_id} but the call authenticated as {party!r}"
    if h.mode != plan.mode:
        return (f"the client's config has train.mode {h.mode!r} but the server runs "
                f"{plan.mode!r}; use the same config on both sides")
    if not 0 <= h.client_id < plan.num_clients:
        return f"client id {h.client_id} is not in 0..{plan.num_clients - 1}"
    if h.cut != plan.cut:
        return (f"client runs {h.cut} blocks but the server's plan cuts at "
                f"{plan.cut}; use the same train.cut on both sides")
    if h.tail != plan.tail:
        return (f"client keeps a tail of {h.tail} blocks but the server's plan has "
                f"{plan.tail}; use the same train.tail on both sides")
    if h.codec not in CODECS:
        return f"unknown codec {h.codec!r}; use one of {', '.join(CODECS)}"
    return plan.samples_problem(h.client_id, h.num_samples)


def decode_upload(data: bytes, plan: WirePlan, codec: str, what: str,
                  bound: float = math.inf) -> Activations:
    """A client's activations, checked against the run's layout and bounds before use.

    Any failure is a :class:`WireError`: whatever a peer sends, the caller refuses that
    message and nothing else (a bug of ours that bad input trips counts as bad input).
    """
    try:
        layout, limits = plan.activation_layout(codec)
        check_header(read_header(data), layout, limits, what)
        wire = unpack(data)
        check_activation_values(wire, plan.vocab_size, what)
        acts = decode_activations(wire, codec, plan.dtype)
        check_magnitude({"hidden": acts.hidden}, bound, what)
    except WireError as e:
        raise e if str(e).startswith(what) else WireError(f"{what}: {e}") from None
    except Exception as e:
        log.exception("%s: unexpected failure while checking it", what)
        raise WireError(f"{what}: could not be read ({type(e).__name__}: {e})") from None
    return acts


class Admission(Protocol):
    """What the gRPC front needs from whoever runs the rounds: the plan, the hello check
    and a place to hand new streams."""

    plan: WirePlan
    fed: FedService | RemoteFed | None
    inbox_limit: int  # messages a client may have waiting (more: its stream is closed)

    def check_hello(self, party: str, frame: pb.ClientFrame) -> str | None: ...

    def register(self, session: Session) -> None: ...

    def upload_limit(self, codec: str) -> int: ...


class TrainingServicer(pb_grpc.SplitTrainingServicer):
    """Authenticates each stream, checks its hello, and hands it to the coordinator.

    Each party may hold ``net.streams_per_party`` streams (the gate), a stream must say
    hello within ``net.hello_timeout_s``, and a client may have at most the coordinator's
    ``inbox_limit`` messages waiting: a flood of uploads ends its stream instead of
    growing the server (or keeping it busy refusing).
    """

    def __init__(self, coordinator: Admission, auth: Authenticator, net: NetConfig,
                 gate: StreamGate | None = None) -> None:
        self.coordinator = coordinator
        self.auth = auth
        self.net = net
        self.gate = gate

    def Train(self, request_iterator: Iterator[pb.ClientFrame],  # noqa: N802 (gRPC's name)
              context: grpc.ServicerContext) -> Iterator[pb.ServerFrame]:
        party = self.auth.identify(context, "Train")
        ticket = admit(self.gate, "Train", party, context)
        try:
            yield from self._train(party, request_iterator, context)
        finally:
            if ticket is not None:
                ticket.release()

    def _train(self, party: str, request_iterator: Iterator[pb.ClientFrame],
               context: grpc.ServicerContext) -> Iterator[pb.ServerFrame]:
        first = first_within(request_iterator, self.net.hello_timeout_s)
        if isinstance(first, TimeoutError):
            reason = (f"no hello within net.hello_timeout_s={self.net.hello_timeout_s:g} s "
                      "of opening the stream")
            log.warning("closed a stream of party %s from %s: %s", party, context.peer(), reason)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, reason)
        if first is None:
            return
        problem = self.coordinator.check_hello(party, first)
        if problem:
            log.warning("refused client %s from %s: %s", party, context.peer(), problem)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        session = Session(first.hello, self.net.chunk_bytes)
        context.add_callback(session.end)  # the call is over: stop waiting for output
        threading.Thread(target=self._read, args=(request_iterator, session),
                         name=f"read-client-{session.client_id}", daemon=True).start()
        log.info("client %d connected from %s (codec %s)", session.client_id, context.peer(),
                 session.codec)
        self.coordinator.register(session)
        while True:
            item = session.outbox.get()
            if item is _END:
                return
            if isinstance(item, _Abort):
                context.abort(item.code, item.message)
            yield item

    def _read(self, requests: Iterator[pb.ClientFrame], session: Session) -> None:
        assembler = Reassembler(lambda: self.coordinator.upload_limit(session.codec))
        try:
            for frame in requests:
                if session.gone.is_set():
                    return
                item: Any = None
                if frame.WhichOneof("body") != "chunk":
                    item = WireError("a second hello in one stream")
                else:
                    try:
                        item = assembler.feed(frame.chunk)
                    except WireError as e:
                        item = e
                    except Exception as e:  # refuse; never let a frame end the reader
                        item = WireError(f"unreadable chunk ({type(e).__name__}: {e})")
                if item is None:
                    continue
                limit = self.coordinator.inbox_limit
                if session.inbox.qsize() >= limit:
                    reason = (f"client {session.client_id} sent a message while {limit} "
                              "were still waiting for the server; the stream is closed")
                    log.warning("%s", reason)
                    session.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
                    return
                session.inbox.put(item)
        except grpc.RpcError:
            pass  # the client went away; the coordinator learns it from GONE
        finally:
            session.gone.set()
            session.inbox.put(GONE)


class Coordinator:
    """Runs the rounds: admit clients, serve their steps in id order, aggregate, checkpoint."""

    inbox_limit = 1  # a client uploads once per round and waits for the answer

    def __init__(self, server: MainServer, plan: WirePlan, net: NetConfig,
                 fed: FedService | RemoteFed, rec: Recorder, *, start_round: int = 0,
                 checkpoint: Path | None = None, server_fed: FedServer | None = None,
                 run_info: Mapping[str, Any] | None = None) -> None:
        self.server = server
        self.plan = plan
        self.net = net
        self.fed = fed
        self.rec = rec
        self.start_round = start_round
        self.checkpoint = checkpoint
        self.run_info = dict(run_info or {})  # saved with every checkpoint (its config)
        self.server_fed = server_fed  # SFL-V1: averages the per-client server copies
        self.bound = plan.value_bound(net.max_activation)
        self._cond = threading.Condition()
        self._pending: dict[int, Session] = {}
        self._active: dict[int, Session] = {}
        self.backoff = Backoff()  # clients that keep timing out or being refused

    # -- called from stream threads ------------------------------------------------------
    def check_hello(self, party: str, frame: pb.ClientFrame) -> str | None:
        return hello_problem(party, frame, self.plan)

    def upload_limit(self, codec: str) -> int:
        """One batch of activations (``net.max_tensor_mb`` when set)."""
        return self.net.tensor_limit(self.plan.upload_bytes(codec))

    def register(self, session: Session) -> None:
        with self._cond:
            for table in (self._pending, self._active):
                old = table.pop(session.client_id, None)
                if old is not None:
                    old.abort(grpc.StatusCode.ABORTED, "replaced by a newer connection of the "
                              "same client")
            self._pending[session.client_id] = session
            self._cond.notify_all()

    # -- the coordinator thread ---------------------------------------------------------
    def run(self) -> None:
        self._await_clients(self.net.min_clients or self.plan.num_clients, everyone=True)
        for t in range(self.start_round, self.plan.steps):
            self._admit(t)
            if not self._active:  # everyone left: go on as soon as anyone is back
                self._await_clients(1, everyone=False)
                self._admit(t)
            with self._cond:
                serving = sorted(self._active.items())
            moved = {cid: self._step(t, session) for cid, session in serving}
            wire = {cid: sizes for cid, sizes in moved.items() if sizes is not None}
            present = list(wire)
            n = max(len(present), 1)
            log.info("round %d: %d of %d clients stepped, %d bytes up and %d down per step",
                     t, len(present), self.plan.num_clients,
                     sum(up for up, _ in wire.values()) // n,
                     sum(down for _, down in wire.values()) // n)
            if self.plan.aggregates_at(t):
                self._aggregate(t, present, {cid: s.num_samples for cid, s in serving})
            if self.checkpoint is not None:
                self._save(t)
            self.rec.end_round(t)
        self._finish()

    def _await_clients(self, need: int, *, everyone: bool) -> None:
        """Wait for ``need`` clients, or with ``everyone`` for all of them until the join
        timeout (then settle for ``need``)."""
        deadline = time.monotonic() + self.net.join_timeout_s
        want = self.plan.num_clients if everyone else need
        with self._cond:
            while (len(self._pending) + len(self._active) < want
                   and time.monotonic() < deadline):
                self._cond.wait(deadline - time.monotonic())
            have = len(self._pending) + len(self._active)
        if have < need:
            raise TimeoutError(f"only {have} of {self.plan.num_clients} clients connected within "
                               f"net.join_timeout_s={self.net.join_timeout_s:g} s (need {need}); "
                               "start the missing clients or lower net.min_clients")
        log.info("%d of %d clients connected", have, self.plan.num_clients)

    def _admit(self, round: int) -> None:
        """Admit the waiting clients, except those serving a back-off for timing out again
        and again (unless nobody else is training: then a slow client beats none)."""
        with self._cond:
            ready = {cid: s for cid, s in self._pending.items()
                     if self.backoff.ready(cid, round)}
            if not ready and not self._active:
                ready = dict(self._pending)
            joining = ready
            self._pending = {cid: s for cid, s in self._pending.items() if cid not in ready}
            self._active.update(joining)
        for cid in self._pending:
            log.info(self.backoff.explain(cid))
        p = self.plan
        for cid, session in sorted(joining.items()):
            session.outbox.put(pb.ServerFrame(welcome=pb.Welcome(
                round=round, steps=p.steps, interval=p.interval, mode=p.mode, cut=p.cut)))
            log.info("client %d admitted at round %d", cid, round)

    def _refused_step(self, session: Session, round: int, reason: str) -> None:
        """Refuse this round's upload, and count it against the client: a connected
        client is still served next round (a refusal changes nothing else), but one that
        reconnects after refusals in a row, as a flood whose stream was cut does, waits
        out its back-off first."""
        self._refuse(session, round, reason)
        self.backoff.strike(session.client_id, round)

    def _remove(self, session: Session) -> None:
        with self._cond:
            if self._active.get(session.client_id) is session:
                del self._active[session.client_id]

    def _refuse(self, session: Session, round: int, reason: str) -> None:
        log.warning("round %d: refused client %d's upload: %s", round, session.client_id, reason)
        session.control(pb.Control.REFUSED, round, reason)

    def _step(self, t: int, session: Session) -> tuple[int, int] | None:
        """Serve one client's step of round ``t``: the bytes up and down if it took part."""
        cid = session.client_id
        what = f"activations of client {cid}, round {t}"
        sent: list[int] = []  # bytes down, before the gradient (U-shaped: the middle's)
        received: list[int] = []  # bytes up
        try:
            item = self._next(t, session, "activations")
            received.append(len(item.data))
            acts = self._decode(t, session, item)
            tail = None
            if self.plan.tail:
                def tail(returned: torch.Tensor) -> ServerReply:
                    data = pack(encode("mid", returned, session.codec))
                    session.send("mid", t, data)
                    sent.append(len(data))
                    blob = self._next(t, session, "the tail's gradient")
                    received.append(len(blob.data))
                    return decode_tail(blob, t, returned, session.codec, self.bound,
                                       f"tail gradient of client {cid}, round {t}")
            reply = guarded_step(self.server, cid, acts, self.bound, what, tail)
        except _Missed:
            return None
        except WireError as e:
            self._refused_step(session, t, str(e))
            return None
        data = pack(encode("grad", reply.grad, session.codec),
                    {"loss": repr(reply.loss), "tokens": str(reply.tokens)})
        session.send("grad", t, data)
        up, down = sum(received), sum(sent) + len(data)
        self.backoff.clear(cid)
        self.rec.train_step(round=t, client=cid, loss=reply.loss, tokens=reply.tokens,
                            bytes_up=up, bytes_down=down, lr=self.server.lr)
        log.debug("round %d client %d: loss %.4f, %d bytes up, %d down", t, cid, reply.loss,
                  up, down)
        return up, down

    def _next(self, t: int, session: Session, waiting_for: str) -> Blob:
        """The client's next blob of round ``t``; :class:`_Missed` if it timed out or went
        away (it leaves the round), :class:`WireError` if what came cannot be read."""
        cid = session.client_id
        try:
            item = session.inbox.get(timeout=self.net.step_timeout_s)
        except queue.Empty:
            reason = (f"no {waiting_for} for round {t} within net.step_timeout_s="
                      f"{self.net.step_timeout_s:g} s: dropped from the round; reconnect to "
                      "rejoin")
            log.warning("client %d: %s", cid, reason)
            session.abort(grpc.StatusCode.DEADLINE_EXCEEDED, reason)
            self._remove(session)
            self.backoff.strike(cid, t)
            raise _Missed from None
        if item is GONE:
            log.warning("client %d disconnected in round %d; the round goes on without it", cid, t)
            self._remove(session)
            raise _Missed
        if isinstance(item, WireError):
            raise WireError(f"upload of client {cid}, round {t}: {item}")
        return item

    def _decode(self, t: int, session: Session, blob: Blob) -> Activations:
        what = f"activations of client {session.client_id}, round {t}"
        if blob.kind != "acts" or blob.round != t:
            raise WireError(f"{what}: got a {blob.kind!r} blob of round {blob.round} instead")
        return decode_upload(blob.data, self.plan, session.codec, what, self.bound)

    def _aggregate(self, t: int, present: list[int], samples: dict[int, int]) -> None:
        self.fed.open(t, present)
        if self.server_fed is not None and present:
            states = [self.server.adapter_state(cid) for cid in present]
            merged = self.server_fed.aggregate(states, [samples[cid] for cid in present])
            self.server.load_adapter_state(merged)
            self.rec.event("aggregate", round=t, side="server", clients=present)
        if not isinstance(self.fed, FedService):
            # The fed server runs elsewhere: which clients it aggregated is its record.
            self.rec.event("aggregate", round=t, side="client", opened=present)
            return
        # Wait for the clients' aggregate so the checkpoint of this round holds it;
        # shrink the round when a client leaves instead of waiting out its timeout.
        while not self.fed.wait(t, 0.05):
            alive = [c for c in present if c in self._active and
                     not self._active[c].gone.is_set()]
            if alive != present:
                present = alive
                self.fed.open(t, present)
        links = self.fed.links(t)
        self.rec.event("aggregate", round=t, side="client",
                       clients=self.fed.aggregated(t) or [], links=links,
                       bytes_up=sum(up for _, up, _ in links),
                       bytes_down=sum(down for _, _, down in links))

    def _save(self, t: int) -> None:
        assert self.checkpoint is not None
        state = {**self.run_info, "round": t, "server": self.server.state_dict(),
                 "fed": self.fed.state_dict() if isinstance(self.fed, FedService) else None,
                 "step": self.rec.step}
        atomic_save(state, self.checkpoint)

    def _finish(self) -> None:
        with self._cond:
            sessions = [*self._active.values(), *self._pending.values()]
        for session in sessions:
            session.control(pb.Control.DONE, self.plan.steps - 1, "run complete")
            session.end()
        log.info("run complete after %d rounds", self.plan.steps)


_REFUSALS = Throttle(60.0)


def admit(gate: StreamGate | None, service: str, party: str,
          context: grpc.ServicerContext) -> Ticket | None:
    """A place for this call under the gate, or abort it with RESOURCE_EXHAUSTED."""
    if gate is None:
        return None
    got = gate.enter(service, party)
    if isinstance(got, str):
        if _REFUSALS.due((service, party)):  # a flood of refusals must not flood the log
            log.warning("refused a %s call from %s: %s (further refusals of this party "
                        "are logged once a minute)", service, context.peer(), got)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, got)
    assert isinstance(got, Ticket)
    context.add_callback(got.release)  # the call is over, however it ended
    return got


def stream_gate(net: NetConfig, num_clients: int, *, federation: bool) -> StreamGate:
    """Caps for a server of ``num_clients``: ``net.streams_per_party`` calls per party and
    service, the main server's own calls to a fed server included."""
    k = net.streams_per_party
    per_party = {"Train": k, "Federation": k}
    per_service = {"Train": k * num_clients}
    if federation:
        per_service["Federation"] = k * (num_clients + 1)
    return StreamGate(per_party, per_service)


def listen(coordinator: Admission, net: NetConfig, tokens: Mapping[str, str] | None, *,
           address: str | None = None) -> tuple[grpc.Server, int]:
    """Serve the coordinator's clients (and its fed service, when it runs in this process)
    on ``address`` (default ``net.host:net.port``); returns the started server and its port.
    """
    n = coordinator.plan.num_clients
    # Every open call holds a worker thread: the gate caps them per party and per service
    # (so training and federation cannot starve each other), the pool has a worker for
    # each admitted call, and gRPC refuses what is beyond at once instead of queueing it.
    gate = stream_gate(net, n, federation=isinstance(coordinator.fed, FedService))
    server = grpc.server(ThreadPoolExecutor(max_workers=gate.workers), options=options(net),
                         maximum_concurrent_rpcs=gate.workers,
                         interceptors=[peer_rate_limit(net)])
    auth = Authenticator(tokens, {str(i) for i in range(n)}, net)
    pb_grpc.add_SplitTrainingServicer_to_server(TrainingServicer(coordinator, auth, net, gate),
                                                server)
    if isinstance(coordinator.fed, FedService):
        pb_grpc.add_FederationServicer_to_server(
            FederationServicer(coordinator.fed, auth, net, gate), server)
    port = bind(server, address or f"{net.host}:{net.port}", net)
    server.start()
    return server, port
