"""The main server of a heterogeneous run: remote clients as role objects.

HSplitLoRA plans every client (cut and ranks), probes importance through the clients and
aggregates participants whose adapters span both sides of the cut, so the main server runs
the ordinary training loop (:func:`hsplitlora.train.run.train`, the same
:class:`~hsplitlora.train.hetero.HeteroSystem` and planner as a simulation) with
:class:`HeteroHub` as its placement: the server role lives here, and each client is a
:class:`RemoteClient`, a proxy with the :class:`~hsplitlora.roles.client.Client` methods
that turns every call into a "call" blob on that client's stream
(:mod:`hsplitlora.transport.calls`). The client's process keeps its data and runs the
role (:mod:`hsplitlora.transport.host`).

A client that disconnects, stalls past ``net.step_timeout_s``, fails a call or sends
something that fails validation is dropped (its stream aborted with the reason) and the
run goes on without it (:class:`~hsplitlora.train.placement.PartyLost`). When it connects
again it is admitted at the next round boundary and brought up to date: its plan, the
base weights merged since the start, and its current adapters.

As every round ends each client snapshots its own state (``snapshot``) before the server
checkpoints the run; a resumed server sends each client back to that snapshot
(``restore``). With ``net.fed_address`` set, clients upload their adapters to that fed
server (``upload``) and the aggregate comes back here
(:mod:`hsplitlora.transport.hetero_fed`).

A U-shaped client (``train.tail``) keeps its tail and labels: the server's step is
:func:`~hsplitlora.transport.guard.guarded_step` around the round trip to that tail (the
middle's output down as a ``finish`` call, the tail's gradient back as ``tailgrad``), and
its importance probing takes the same two hops.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import torch
from torch import nn

from hsplitlora.config import RunConfig
from hsplitlora.models.lora import LoraSettings, adapter_shapes, matrix_shapes
from hsplitlora.models.shared import merge_state
from hsplitlora.models.split import ArchSpec, arch_spec, num_blocks
from hsplitlora.models.structure import client_blocks
from hsplitlora.roles.messages import Activations, ServerReply
from hsplitlora.roles.server import MainServer
from hsplitlora.train.engine import everyone
from hsplitlora.train.placement import Attendance, PartyLost, Recipe
from hsplitlora.train.prepared import Prepared
from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport.calls import pack_call, pack_updates, read_scores, settings_to_json
from hsplitlora.transport.codec import encode
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.guard import guarded_step
from hsplitlora.transport.hetero_fed import RemoteFedAggregation
from hsplitlora.transport.limits import Backoff
from hsplitlora.transport.plan import WirePlan, widest_adapter_bytes
from hsplitlora.transport.server import (
    GONE,
    Session,
    decode_tail,
    decode_tail_grad,
    decode_upload,
    hello_problem,
    listen,
)
from hsplitlora.transport.validate import check_finite, check_header, check_magnitude
from hsplitlora.transport.wire import Blob, WireError, pack, read_header, unpack

if TYPE_CHECKING:
    from hsplitlora.hetero.importance import ProbeServer

__all__ = ["HeteroHub", "RemoteClient"]

log = logging.getLogger(__name__)

_GRACE_S = 5.0


@dataclass(frozen=True)
class _Wired(Activations):
    """Activations as they arrived, with the bytes they took on the wire."""

    wire_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.wire_bytes


@dataclass(frozen=True)
class _WiredReply(ServerReply):
    """The server's reply, with its gradient already packed for the client's codec."""

    packed: bytes = b""

    @property
    def nbytes(self) -> int:
        return len(self.packed)


@dataclass(frozen=True)
class _WiredTail(ServerReply):
    """A U-shaped client's answer from its tail, with the bytes it took on the wire (the
    record counts them up, and the middle's output down at the same size: the two blobs
    differ only in their headers)."""

    wire_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.wire_bytes


class _Server:
    """The server role as the run sees it: steps answer with the gradient packed for the
    client's codec, so the record shows wire bytes and the proxy sends the same bytes."""

    def __init__(self, role: MainServer, hub: HeteroHub) -> None:
        self._role = role
        self._hub = hub
        self._done: dict[int, ServerReply] = {}  # U-shaped steps already taken, by client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._role, name)

    def step(self, client_id: int, acts: Activations) -> ServerReply:
        """The role's step, undone if its outcome is not finite (as in the homogeneous
        modes): then the client is dropped from the round, and nothing it sent stays."""
        proxy = self._hub.clients[client_id]
        what = f"activations of client {client_id}, round {proxy.round}"
        try:
            reply = guarded_step(self._role, client_id, acts, self._hub.bound, what,
                                 proxy.tail_trip if proxy.holds_tail else None)
        except WireError as e:
            raise proxy.refuse(str(e)) from None
        self._hub.backoff.clear(client_id)
        packed = pack_call("backward", None, encode("grad", reply.grad, proxy.codec))
        proxy.outgoing = (reply.grad, packed)
        return _WiredReply(reply.loss, reply.tokens, reply.grad, packed)

    def forward(self, client_id: int, acts: Activations) -> Activations:
        """A U-shaped step, whole: the guarded two hops around the client's tail run here
        (a failure anywhere undoes the server's step); ``finish`` and ``backward`` then
        hand back what they already computed, as the training loop asks for them."""
        self._done[client_id] = self.step(client_id, acts)
        return acts

    def backward(self, client_id: int, grad: torch.Tensor) -> torch.Tensor:
        return self._done.pop(client_id).grad


class RemoteClient:
    """One remote client, with the :class:`~hsplitlora.roles.client.Client` methods a
    heterogeneous run calls. Calls that return nothing are sent and not waited for (the
    stream keeps them in order); the others wait up to ``net.step_timeout_s``."""

    def __init__(self, hub: HeteroHub, client_id: int, num_samples: int, cut: int,
                 settings: LoraSettings) -> None:
        self.hub = hub
        self.client_id = client_id
        self.num_samples = num_samples
        self.cut = cut
        self.settings = settings
        # The adapter last loaded into the client (None: as ``settings`` initialise it),
        # to bring it back after a reconnection.
        self.adapters: dict[str, torch.Tensor] | None = None
        self.session: Session | None = None
        self.round = 0
        self.outgoing: tuple[torch.Tensor, bytes] | None = None
        # After a resume: the round of the client's own snapshot it should go back to,
        # until it trains or its adapters change (then the snapshot is out of date).
        self.snapshot: int | None = None
        self.forward_requested = False  # this round's forward call is already sent
        self._tail_reply: ServerReply | None = None  # a U-shaped step's answer from the tail

    @property
    def holds_tail(self) -> bool:
        """A U-shaped split: the client keeps its tail, its labels and the loss."""
        return self.hub.plan.tail > 0

    def tail_trip(self, returned: torch.Tensor) -> ServerReply:
        """The middle's output at ``L - tail`` down to the client; its tail's gradient
        there (with loss and target tokens) back, checked."""
        what = f"tail gradient of client {self.client_id}, round {self.round}"
        self._ask_with("finish", encode("mid", returned, self.codec))
        blob = self._await("tailgrad", what)
        try:
            reply = decode_tail(blob, self.round, returned, self.codec, self.hub.bound, what)
        except WireError as e:
            raise self._lose(str(e), grpc.StatusCode.INVALID_ARGUMENT, strike=True) from None
        self._tail_reply = _WiredTail(reply.loss, reply.tokens, reply.grad, len(blob.data))
        return reply

    def finish(self, returned: Any) -> ServerReply:
        """The tail's answer of the U-shaped step the server has just taken."""
        reply, self._tail_reply = self._tail_reply, None
        if reply is None:
            raise PartyLost(f"client {self.client_id}: no tail answer for round {self.round}")
        return reply

    @property
    def here(self) -> bool:
        return self.session is not None and not self.session.gone.is_set()

    @property
    def codec(self) -> str:
        return self.session.codec if self.session is not None else "none"

    # -- the stream ----------------------------------------------------------------------
    def _send(self, method: str, args: Mapping[str, Any] | None = None,
              tensors: Mapping[str, torch.Tensor] | None = None) -> bool:
        if not self.here:
            return False
        assert self.session is not None
        self.session.send("call", self.round, pack_call(method, args, tensors))
        return True

    def _ask(self, method: str, args: Mapping[str, Any] | None = None) -> None:
        """Send a call whose answer the caller will wait for; a client that is not
        connected cannot answer."""
        self._ask_with(method, None, args)

    def _ask_with(self, method: str, tensors: Mapping[str, torch.Tensor] | None,
                  args: Mapping[str, Any] | None = None) -> None:
        if not self._send(method, args, tensors):
            raise PartyLost(f"client {self.client_id} is not connected")

    def _lose(self, reason: str, code: grpc.StatusCode, *, strike: bool = False) -> PartyLost:
        """Drop the client from the round; ``strike``: it failed its step (timed out, or
        sent what was refused), which counts toward its back-off."""
        session, self.session = self.session, None
        if session is not None:
            session.abort(code, reason)
        if strike:
            self.hub.backoff.strike(self.client_id, self.round)
        log.warning("client %d dropped in round %d: %s", self.client_id, self.round, reason)
        return PartyLost(f"client {self.client_id}: {reason}")

    def refuse(self, reason: str) -> PartyLost:
        """Drop the client from the round for a step the server undid: ABORTED, which
        the client retries, so it reconnects and is readmitted at the next round."""
        return self._lose(reason, grpc.StatusCode.ABORTED, strike=True)

    def _await(self, kind: str, what: str) -> Blob:
        if not self.here:
            raise PartyLost(f"client {self.client_id} is not connected")
        assert self.session is not None
        timeout = self.hub.net.step_timeout_s
        try:
            item = self.session.inbox.get(timeout=timeout)
        except queue.Empty:
            raise self._lose(f"no {what} within net.step_timeout_s={timeout:g} s; reconnect "
                             "to rejoin", grpc.StatusCode.DEADLINE_EXCEEDED,
                             strike=True) from None
        if item is GONE:
            raise self._lose("disconnected", grpc.StatusCode.CANCELLED)
        if isinstance(item, WireError):
            raise self._lose(f"its {what} was refused: {item}", grpc.StatusCode.INVALID_ARGUMENT,
                             strike=True)
        if item.kind == "error":
            try:
                message = read_header(item.data).meta.get("message", "no reason given")
            except WireError as e:
                message = f"(its error report was unreadable: {e})"
            raise self._lose(f"it failed a call: {message}", grpc.StatusCode.ABORTED)
        if item.kind != kind:
            raise self._lose(f"it sent a {item.kind!r} blob where its {what} was due",
                             grpc.StatusCode.INVALID_ARGUMENT, strike=True)
        return item

    def _activations(self, blob: Blob, what: str) -> Activations:
        try:
            plan = self.hub.plan
            acts = decode_upload(blob.data, plan, self.codec, what, self.hub.bound)
        except WireError as e:
            raise self._lose(f"its {what} were refused: {e}",
                             grpc.StatusCode.INVALID_ARGUMENT, strike=True) from None
        return _Wired(acts.hidden, acts.attention_mask, acts.labels, len(blob.data))

    # -- the Client methods --------------------------------------------------------------
    def request_forward(self) -> None:
        """Ask for this round's activations ahead of :meth:`forward`."""
        self.snapshot = None
        self.forward_requested = self._send("forward")

    def forward(self) -> Activations:
        self.snapshot = None
        if not self.forward_requested:
            self._ask("forward")
        self.forward_requested = False
        what = f"activations of client {self.client_id}, round {self.round}"
        return self._activations(self._await("reply", what), what)

    def backward(self, grad: torch.Tensor) -> None:
        out, self.outgoing = self.outgoing, None
        if out is not None and out[0] is grad:
            packed = out[1]
        else:
            packed = pack_call("backward", None, encode("grad", grad, self.codec))
        if self.here:
            assert self.session is not None
            self.session.send("call", self.round, packed)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        self._ask("adapter_state")
        what = f"adapter of client {self.client_id}, round {self.round}"
        blob = self._await("reply", what)
        layout = {k: ("F32", shape) for k, shape in self.hub.adapter_layout(
            self.cut, self.settings).items()}
        try:
            check_header(read_header(blob.data), layout, {}, what)
            state = unpack(blob.data)
            check_finite(state, what)
            check_magnitude(state, self.hub.bound, what)
        except WireError as e:
            raise self._lose(str(e), grpc.StatusCode.INVALID_ARGUMENT) from None
        return state

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.adapters, self.snapshot = dict(state), None
        self._send("load_adapter_state", tensors=state)

    def apply_update(self, updates: Mapping[str, Any], settings: LoraSettings,
                     version: int) -> None:
        self.settings, self.adapters, self.snapshot = settings, None, None
        mine = {m: u for m, u in updates.items() if m in self.hub.modules_below(self.cut)}
        self._send("apply_update", {"settings": settings_to_json(settings), "version": version},
                   pack_updates(mine))

    def reset_adapters(self, settings: LoraSettings) -> None:
        self.settings, self.adapters, self.snapshot = settings, None, None
        self._send("reset_adapters", {"settings": settings_to_json(settings)})

    def upload(self, round: int) -> bool:
        """Tell the client to upload its adapter to the fed server (for ``round``'s
        aggregation); False when it is not connected."""
        return self._send("upload", {"round": round})

    def state_dict(self) -> dict[str, Any]:
        """The client snapshots its own state as this round ends (its optimizer, data
        position and RNG never leave it); the server's checkpoint records the round, and
        the adapters it would rebuild the client with should that snapshot be lost."""
        self._ask("snapshot", {"round": self.round})
        self._await("reply", f"snapshot of client {self.client_id}, round {self.round}")
        return {"snapshot": self.round, "adapters": self.adapters}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Send the client back to its snapshot (now, or when it next connects)."""
        self.adapters, self.snapshot = state["adapters"], state["snapshot"]
        self._restore()

    def _restore(self) -> None:
        # The cached adapters first: a client without the snapshot keeps these.
        if self.adapters is not None:
            self._send("load_adapter_state", tensors=self.adapters)
        if self.snapshot is not None:
            self._send("restore", {"round": self.snapshot})

    def replace_segment(self, segment: nn.Module) -> None:
        """The cut changed at a re-plan: the client rebuilds its segment from its own copy
        of the base, with the merged weights of its blocks sent along."""
        self.cut = len(segment.blocks)  # type: ignore[arg-type]
        self._build()

    def score(self, n: int, server: ProbeServer) -> dict[str, float]:
        """Importance probing: the client scores its blocks on ``n`` probe batches of its
        own; each of its uploads is answered by ``server`` (the server-side scorer)."""
        self._ask("score", {"n": n})
        assert self.session is not None
        for i in range(n):
            what = f"probe activations {i} of client {self.client_id}"
            acts = self._activations(self._await("probe", what), what)
            if self.holds_tail:
                middle = server.forward(acts)
                self.session.send("probe_mid", self.round, pack(encode("mid", middle,
                                                                       self.codec)))
                answer = ServerReply(math.nan, 0, server.backward(
                    self._probe_tail_grad(middle, f"probe tail gradient {i} of client "
                                                  f"{self.client_id}")))
            else:
                answer = server.reply(acts)
            self.session.send("probe_grad", self.round, pack(
                encode("grad", answer.grad, self.codec),
                {"loss": repr(answer.loss), "tokens": str(answer.tokens)}))
        what = f"importance scores of client {self.client_id}"
        blob = self._await("reply", what)
        try:
            return read_scores(read_header(blob.data).meta, self.hub.modules_below(self.cut),
                               what)
        except WireError as e:
            raise self._lose(str(e), grpc.StatusCode.INVALID_ARGUMENT) from None

    def _probe_tail_grad(self, like: torch.Tensor, what: str) -> torch.Tensor:
        """A U-shaped client's probe gradient at ``L - tail``, checked like a step's."""
        blob = self._await("probe_tailgrad", what)
        try:
            return decode_tail_grad(blob.data, like, self.codec, self.hub.bound, what)[1]
        except WireError as e:
            raise self._lose(str(e), grpc.StatusCode.INVALID_ARGUMENT, strike=True) from None

    # -- (re)admission -------------------------------------------------------------------
    def _build(self) -> None:
        deltas, version = self.hub.merged_deltas(self.cut)
        self._send("build", {"cut": self.cut, "settings": settings_to_json(self.settings),
                             "version": version}, deltas)

    def admit(self, session: Session, round: int) -> None:
        """Bring a (re)connected client to the run's state at the start of ``round``."""
        self.session, self.round, self.forward_requested = session, round, False
        p = self.hub.plan
        session.outbox.put(pb.ServerFrame(welcome=pb.Welcome(
            round=round, steps=p.steps, interval=p.interval, mode=p.mode, cut=-1)))
        self._build()
        self._restore()
        log.info("client %d admitted at round %d: cut %d", self.client_id, round, self.cut)


class HeteroHub:
    """The placement of a networked heterogeneous run, and the admission desk of its
    gRPC front: the server role is built here, clients are :class:`RemoteClient`s.

    It listens as soon as it exists (clients may connect while the server still loads);
    :meth:`bind` hands it the prepared run, which fixes the layouts uploads must have.
    """

    def __init__(self, cfg: RunConfig, net: NetConfig, tokens: Mapping[str, str] | None,
                 *, port_file: Path | None = None) -> None:
        t = cfg.train
        if not cfg.mode.planned:
            raise ValueError(f"HeteroHub runs the heterogeneous modes, not {t.mode!r}")
        self.cfg, self.net = cfg, net
        self.fed = None  # aggregation runs inside the training loop, in this process
        # Model-dependent fields are filled in by bind(); the hello check needs none.
        self.plan = WirePlan(mode=t.mode, steps=t.steps, interval=t.agg_interval, cut=-1,
                         num_clients=t.num_clients, batch_size=t.batch_size,
                         max_length=cfg.data.max_length, hidden_size=0, vocab_size=0,
                         dtype=torch.float32, tail=t.tail)
        self.clients: dict[int, RemoteClient] = {}
        self.start_round = 0  # where the run goes on (set by bind() when it resumes)
        self.device = torch.device("cpu")
        self._cond = threading.Condition()
        self._pending: dict[int, Session] = {}
        self._base: nn.Module | None = None
        self._shapes: dict[str, tuple[int, int]] = {}
        self._blocks = 0  # the model's (set by bind())
        self._adapter_bytes = 0  # the largest adapter a client may upload (set by bind())
        self.backoff = Backoff()  # clients that keep timing out or being refused
        self.spec: ArchSpec | None = None
        self.tokens = tokens
        self._fed: RemoteFedAggregation | None = None
        self._closed = False
        self.grpc_server, self.port = listen(self, net, tokens)
        if port_file is not None:
            tmp = port_file.with_name(f".{port_file.name}.tmp")
            tmp.write_text(str(self.port), encoding="utf-8")
            tmp.replace(port_file)
        log.info("main server listening on %s:%d for %d clients (%s)", net.host, self.port,
                 t.num_clients, t.mode)

    def bind(self, p: Prepared) -> HeteroHub:
        """Take the prepared run (:class:`~hsplitlora.train.prepared.Prepared`); a
        :data:`~hsplitlora.train.run.PlacementFactory`."""
        mc: Any = p.model.config
        head = p.model.get_output_embeddings().weight
        self.plan = WirePlan(**{**self.plan.__dict__, "hidden_size": int(mc.hidden_size),
                            "vocab_size": int(mc.vocab_size), "dtype": head.dtype})
        self.spec = arch_spec(mc)
        self._blocks = num_blocks(mc)
        self._shapes = matrix_shapes(p.model, self.spec.targets)
        self._adapter_bytes = widest_adapter_bytes(
            self._shapes, self.spec, [self.cfg.lora.r, *self.cfg.hetero.rank_set])
        self.device = p.device
        if p.resumed is not None:
            self.start_round = p.resumed["round"] + 1
        if self.net.fed_address is not None:
            from hsplitlora.hetero.planner import aggregator_for

            self._fed = RemoteFedAggregation(
                self.net.fed_address, self.net, (self.tokens or {}).get("server"),
                aggregator=aggregator_for(self.cfg),
                alpha=self.cfg.lora.alpha, shapes=self._shapes, tail=self.cfg.train.tail)
        return self

    @property
    def bound(self) -> float:
        """The largest |value| an activation, gradient or adapter may carry in this run."""
        return self.plan.value_bound(self.net.max_activation)

    # -- the gRPC front's side -----------------------------------------------------------
    def check_hello(self, party: str, frame: pb.ClientFrame) -> str | None:
        return hello_problem(party, frame, self.plan)

    # A reply may wait while the server serves others, beside an error report.
    inbox_limit = 2

    def upload_limit(self, codec: str) -> int:
        """The largest blob a client of this run may send (``net.max_tensor_mb`` when
        set): one batch of activations (the same size at every cut) or its adapter at the
        largest rank on every matrix it could hold, since re-plans move cuts and ranks.
        Before :meth:`bind` only small messages can be legitimate (no call was sent)."""
        return self.net.tensor_limit(max(self.plan.upload_bytes(codec), self._adapter_bytes))

    def register(self, session: Session) -> None:
        with self._cond:
            old = self._pending.pop(session.client_id, None)
            proxy = self.clients.get(session.client_id)
            current = proxy.session if proxy is not None else None
            for stale in (old, current):
                if stale is not None:
                    stale.abort(grpc.StatusCode.ABORTED, "replaced by a newer connection of "
                                "the same client")
            self._pending[session.client_id] = session
            self._cond.notify_all()

    # -- Placement -----------------------------------------------------------------------
    def place(self, recipe: Recipe, kind: str) -> Any:
        if kind == "server":
            return _Server(recipe.build(self.device), self)
        r: Any = recipe
        if r.settings is None:
            raise ValueError("remote clients need recipes that carry their LoRA settings")
        proxy = RemoteClient(self, r.client_id, r.num_samples, len(r.segment.blocks),
                             r.settings)
        self.clients[r.client_id] = proxy
        return proxy

    def watch_base(self, base: nn.Module) -> None:
        self._base = base

    def started(self) -> None:
        """Wait for every client (or ``net.min_clients`` once ``net.join_timeout_s`` is
        out), then admit them."""
        n = self.plan.num_clients
        need = self.net.min_clients or n
        deadline = time.monotonic() + self.net.join_timeout_s
        with self._cond:
            while len(self._pending) < n and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            have = len(self._pending)
        if have < need:
            raise TimeoutError(f"only {have} of {n} clients connected within "
                               f"net.join_timeout_s={self.net.join_timeout_s:g} s (need "
                               f"{need}); start the missing clients or lower net.min_clients")
        self._admit(self.start_round)

    def attendance(self, simulated: Attendance) -> Attendance:
        if simulated is not everyone:
            log.warning("client availability is not simulated over the network: each round "
                        "takes the clients that are connected")
        return self.present

    def fed_aggregation(self) -> RemoteFedAggregation | None:
        """The fed server at ``net.fed_address``, if one is set: then the clients'
        adapters go there and only aggregates come here."""
        return self._fed

    def present(self, round: int) -> Collection[int]:
        """The clients connected at the start of ``round`` (admitting those that came
        back); with none left, wait up to ``net.join_timeout_s`` for one."""
        self._admit(round)
        here = [cid for cid, c in sorted(self.clients.items()) if c.here]
        if not here:
            log.warning("round %d: no client is connected; waiting up to %g s", round,
                        self.net.join_timeout_s)
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending), self.net.join_timeout_s)
            self._admit(round)
            here = [cid for cid, c in sorted(self.clients.items()) if c.here]
            if not here:
                raise TimeoutError(f"round {round}: every client is gone and none came back "
                                   f"within net.join_timeout_s={self.net.join_timeout_s:g} s")
        for c in self.clients.values():
            c.round = round
        # The training loop asks each present client for its activations in turn; asking
        # them all now lets every client compute while the server works through the
        # others (exact: within a round no client's step depends on another's).
        for cid in here:
            self.clients[cid].request_forward()
        return here

    def _admit(self, round: int) -> None:
        """Admit the waiting clients, except those serving a back-off (unless no client
        is training: then a slow client beats none), as the homogeneous server does."""
        with self._cond:
            anyone = any(c.here for c in self.clients.values())
            joining = {cid: s for cid, s in self._pending.items()
                       if self.backoff.ready(cid, round) or not anyone}
            self._pending = {cid: s for cid, s in self._pending.items() if cid not in joining}
        for cid in self._pending:
            log.info(self.backoff.explain(cid))
        for cid, session in sorted(joining.items()):
            self.clients[cid].admit(session, round)

    def close(self, check: bool = True) -> None:
        """Tell every connected client the run is over, then stop listening (once)."""
        if self._closed:
            return
        self._closed = True
        last = self.plan.steps - 1
        with self._cond:
            pending = list(self._pending.values())
        for session in [*(c.session for c in self.clients.values() if c.here), *pending]:
            assert session is not None
            session.control(pb.Control.DONE, last, "run complete")
            session.end()
        if self._fed is not None:
            self._fed.finish(last)
        self.grpc_server.stop(_GRACE_S).wait()

    # -- what the proxies need from the run ----------------------------------------------
    def block_of(self, name: str) -> int:
        assert self.spec is not None, "bind() the prepared run first"
        return self.spec.block_of(name)

    def _held(self, cut: int) -> dict[str, tuple[int, int]]:
        """The adaptable matrices of the blocks a client at ``cut`` runs (and its tail)."""
        assert self.spec is not None, "bind() the prepared run first"
        own = set(client_blocks(cut, self.plan.tail, self._blocks))
        return {m: s for m, s in self._shapes.items() if self.block_of(m) in own}

    def modules_below(self, cut: int) -> set[str]:
        """The adaptable matrices a client with ``cut`` holds (a U-shaped one's tail's too)."""
        return set(self._held(cut))

    def adapter_layout(self, cut: int, settings: LoraSettings) -> dict[str, tuple[int, int]]:
        assert self.spec is not None, "bind() the prepared run first"
        return adapter_shapes(self._held(cut), settings, self.spec.default_targets)

    def merged_deltas(self, cut: int) -> tuple[dict[str, torch.Tensor], int]:
        """What aggregations have merged into the base weights of the blocks a client at
        ``cut`` runs (fp32, in each weight's layout, keyed ``<module>.weight``), and the
        last merge's version: a client adds them to the pristine weights every process
        loads."""
        if self._base is None:
            return {}, 0
        out, version = {}, 0
        own = set(client_blocks(cut, self.plan.tail, self._blocks))
        for name, w in self._base.named_parameters():
            state = merge_state(w)
            if state is not None and self.block_of(name) in own:
                out[name] = state.delta
                version = max(version, state.version)
        return out, version

