"""A client process: the :class:`Client` role, a proxy for the main server, and recovery.

:class:`RemoteMainServer` has :meth:`MainServer.step`'s signature, so the client's loop is
the in-process one (forward, step, backward, aggregate every ``I`` rounds) with the server
on the other end of a stream; a U-shaped client's step is the two hops around its tail
(activations up, the middle's output down, the tail's gradient up, the cut's down).
:class:`ClientRunner` adds what a network needs: it keeps a snapshot of the client's state
at the start of each recent round (adapters, optimizer, data position, RNG), so when the
server resumes from its checkpoint, or refuses an upload, the client rewinds to exactly
that round; when it has no such snapshot (it was away) it takes the latest aggregate and
carries on from the server's round.
"""

from __future__ import annotations

import copy
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from hsplitlora.checkpoint import atomic_save, load_checkpoint
from hsplitlora.roles.messages import Activations, ServerReply
from hsplitlora.train.parties import Batches, ClientRecipe
from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport import hsplitlora_pb2_grpc as pb_grpc
from hsplitlora.transport.codec import decode, encode, encode_activations, wire_layout
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.fed import RemoteFed
from hsplitlora.transport.plan import aggregates_at
from hsplitlora.transport.security import (
    ConnectionFailed,
    Refused,
    call_metadata,
    explain,
    open_channel,
)
from hsplitlora.transport.validate import check_finite, check_header, loss_meta
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

__all__ = ["ClientRunner", "Link", "RemoteMainServer", "RunOver", "StepRefused",
           "keep_joining"]

log = logging.getLogger(__name__)

_END = object()
_MAX_BACKOFF_S = 10.0
T = TypeVar("T")


class StepRefused(RuntimeError):
    """The main server refused this step's upload (the message says why)."""


class RunOver(Exception):
    """The server had already finished when we (re)joined."""


def keep_joining(session: Callable[[], T], net: NetConfig, client_id: int,
                 welcomed: Callable[[], bool]) -> T:
    """Run ``session`` until it returns, reconnecting after a lost connection with
    exponential back-off; a session that got as far as the welcome resets the count."""
    attempt = 0
    while True:
        try:
            return session()
        except ConnectionFailed as e:
            attempt = 0 if welcomed() else attempt + 1
            if attempt > net.rejoin_attempts:
                raise ConnectionFailed(f"client {client_id} gave up after {attempt} attempts: "
                                       f"{e}") from None
            wait = min(net.rejoin_backoff_s * 2 ** max(attempt - 1, 0), _MAX_BACKOFF_S)
            log.warning("client %d: %s; reconnecting in %.1f s (attempt %d of %d)",
                        client_id, e, wait, attempt + 1, net.rejoin_attempts + 1)
            time.sleep(wait)


class Link:
    """One client's stream to the main server: frames out through a queue, frames in
    through a reader thread, so every wait can have a timeout."""

    def __init__(self, address: str, net: NetConfig, hello: pb.Hello, token: str | None) -> None:
        self.address = address
        self.net = net
        self._channel = open_channel(address, net)
        self._requests: queue.Queue[Any] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        self._requests.put(pb.ClientFrame(hello=hello))
        self._call = pb_grpc.SplitTrainingStub(self._channel).Train(
            self._outgoing(), metadata=call_metadata(str(hello.client_id), token, "Train", net))
        self._seq = itertools.count()
        self._assembler = Reassembler(net.max_tensor_bytes)
        threading.Thread(target=self._read, name=f"link-{hello.client_id}", daemon=True).start()

    def _outgoing(self) -> Iterator[pb.ClientFrame]:
        while True:
            item = self._requests.get()
            if item is _END:
                return
            yield item

    def _read(self) -> None:
        try:
            for frame in self._call:
                self._responses.put(frame)
            self._responses.put(_END)
        except grpc.RpcError as e:
            self._responses.put(e)

    def send(self, kind: str, round: int, data: bytes) -> None:
        for f in frames(data, kind, round, next(self._seq), self.net.chunk_bytes):
            self._requests.put(pb.ClientFrame(chunk=f))

    def _next(self, timeout: float) -> pb.ServerFrame:
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            raise ConnectionFailed(f"no word from {self.address} for {timeout:g} s "
                                   "(net.reply_timeout_s)") from None
        if item is _END:
            raise ConnectionFailed(f"{self.address} closed the stream")
        if isinstance(item, grpc.RpcError):
            raise explain(item, self.address, self.net)
        return item

    def welcome(self, timeout: float) -> pb.Welcome:
        frame = self._next(timeout)
        body = frame.WhichOneof("body")
        if body == "welcome":
            return frame.welcome
        if body == "control" and frame.control.kind == pb.Control.DONE:
            raise RunOver
        raise WireError(f"{self.address} sent a {body} before its welcome")

    def receive(self, timeout: float) -> Blob | pb.Control:
        """The next whole blob, or a control message."""
        while True:
            frame = self._next(timeout)
            body = frame.WhichOneof("body")
            if body == "control":
                return frame.control
            if body != "chunk":
                raise WireError(f"{self.address} sent an unexpected {body}")
            blob = self._assembler.feed(frame.chunk)
            if blob is not None:
                return blob

    def close(self) -> None:
        self._requests.put(_END)
        self._channel.close()


class RemoteMainServer:
    """The main server as its clients see it: :meth:`MainServer.step` over a :class:`Link`.

    ``round`` says which round the next upload belongs to; the bytes of the last step are
    kept for the caller's records.
    """

    def __init__(self, link: Link, codec: str, timeout_s: float) -> None:
        self.link = link
        self.codec = codec
        self.timeout_s = timeout_s
        self.round = 0
        self.bytes_up = 0
        self.bytes_down = 0

    def step(self, client_id: int, acts: Activations) -> ServerReply:
        data = pack(encode_activations(acts, self.codec))
        self.link.send("acts", self.round, data)
        header, grad, size = self._receive(client_id, "grad", acts.hidden)
        self.bytes_up, self.bytes_down = len(data), size
        return ServerReply(*loss_meta(header.meta, self._what(client_id, "grad")), grad)

    def forward(self, client_id: int, acts: Activations) -> torch.Tensor:
        """U-shaped split: send the activations (no labels), receive the middle's output."""
        data = pack(encode_activations(acts, self.codec))
        self.link.send("acts", self.round, data)
        _, returned, size = self._receive(client_id, "mid", acts.hidden)
        self.bytes_up, self.bytes_down = len(data), size
        return returned

    def backward(self, client_id: int, tail: ServerReply) -> torch.Tensor:
        """U-shaped split: send the tail's gradient (with its loss and target tokens, for
        the server's records), receive the gradient at the cut."""
        data = pack(encode("tailgrad", tail.grad, self.codec),
                    {"loss": repr(tail.loss), "tokens": str(tail.tokens)})
        self.link.send("tailgrad", self.round, data)
        _, grad, size = self._receive(client_id, "grad", tail.grad)
        self.bytes_up, self.bytes_down = self.bytes_up + len(data), self.bytes_down + size
        return grad

    def _what(self, client_id: int, kind: str) -> str:
        return f"{kind} for client {client_id}, round {self.round}"

    def _receive(self, client_id: int, kind: str,
                 like: torch.Tensor) -> tuple[Header, torch.Tensor, int]:
        """The server's next blob, which must be a ``kind`` tensor shaped as ``like``."""
        got = self.link.receive(self.timeout_s)
        if isinstance(got, pb.Control):
            if got.kind == pb.Control.REFUSED:
                raise StepRefused(got.message)
            raise ConnectionFailed("the server ended the run while client "
                                   f"{client_id} waited for its {kind}")
        what = self._what(client_id, kind)
        if got.kind != kind or got.round != self.round:
            raise WireError(f"{what}: got a {got.kind!r} blob of round {got.round} instead")
        header = read_header(got.data)
        check_header(header, wire_layout(kind, self.codec, like.dtype, tuple(like.shape)), {},
                     what)
        wire = unpack(got.data)
        check_finite(wire, what)
        return header, decode(wire, kind, self.codec, like.dtype), len(got.data)


class _CountingStream:
    """A batch stream that knows how many batches it gave, so it can be rebuilt there."""

    def __init__(self, make: Callable[[], Batches], skip: int) -> None:
        self._it = make()
        self.drawn = 0
        for _ in range(skip):
            next(self)

    def __iter__(self) -> _CountingStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._it)
        self.drawn += 1
        return batch


@dataclass
class Snapshot:
    """A client's whole state at the start of a round."""

    round: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    drawn: int  # batches taken from the stream so far
    rng: torch.Tensor
    agg_round: int  # round of the last aggregate loaded
    privacy: dict[str, Any] | None = None  # Client.privacy_state(): noise streams, reference


class ClientRunner:
    """Runs one client against a main server (and fed server) until the run is over,
    reconnecting after a lost connection; returns the client's final adapter."""

    KEEP = 3  # snapshots of recent rounds: a resumed server is at most one round behind

    def __init__(self, party: ClientRecipe, net: NetConfig, server: str, *, mode: str,
                 fed: str | None = None, token: str | None = None,
                 checkpoint: Path | None = None, resume: bool = False,
                 device: torch.device | str = "cpu") -> None:
        self.party = party
        self.mode = mode
        self.device = torch.device(device)
        self.net = net
        self.address = server
        self.fed_address = fed or server
        self.token = token
        self.checkpoint = checkpoint
        self.snapshots: dict[int, Snapshot] = {}
        self.round = 0  # the next round this client will run
        self.agg_round = -1
        self.awaiting: int | None = None  # round whose aggregate we uploaded for, not got
        self.history: list[dict[str, Any]] = []  # one record per completed step
        self._welcomed = False
        self._stream = _CountingStream(party.stream, 0)
        self.client = party.build(self.device, self._stream)
        if resume:
            if checkpoint is None:
                raise ValueError("resume needs the client's checkpoint path")
            snap = Snapshot(**load_checkpoint(checkpoint)["snapshot"])
            self._restore(snap)
            self.snapshots[snap.round] = snap
            log.info("client %d resumes from its checkpoint of round %d", party.client_id,
                     snap.round)

    @property
    def client_id(self) -> int:
        return self.party.client_id

    def run(self) -> dict[str, torch.Tensor]:
        return keep_joining(self._session, self.net, self.client_id, lambda: self._welcomed)

    def _session(self) -> dict[str, torch.Tensor]:
        self._welcomed = False
        hello = pb.Hello(client_id=self.client_id, cut=self.client.cut,
                         num_samples=self.client.num_samples, codec=self.net.codec,
                         mode=self.mode, tail=len(self.client.tail.blocks)
                         if self.client.tail is not None else 0)
        link = Link(self.address, self.net, hello, self.token)
        fed = RemoteFed(self.fed_address, self.net, str(self.client_id), self.token)
        try:
            try:
                welcome = link.welcome(self.net.join_timeout_s + self.net.reply_timeout_s)
            except RunOver:
                log.info("client %d: the run was already over", self.client_id)
                return self.client.adapter_state()
            self._welcomed = True
            self._sync(welcome, fed)
            self._train(link, fed, welcome)
            got = link.receive(self.net.reply_timeout_s)
            if not isinstance(got, pb.Control) or got.kind != pb.Control.DONE:
                raise WireError(f"{self.address} sent {got!r} where the end of the run was due")
            log.info("client %d: run complete", self.client_id)
            return self.client.adapter_state()
        finally:
            link.close()
            fed.close()

    def _train(self, link: Link, fed: RemoteFed, plan: pb.Welcome) -> None:
        remote = RemoteMainServer(link, self.net.codec, self.net.reply_timeout_s)
        for t in range(plan.round, plan.steps):
            self._begin(t)
            remote.round = t
            acts = self.client.forward()
            sent = time.perf_counter()
            try:
                if self.client.holds_tail:
                    reply = self.client.finish(remote.forward(self.client_id, acts))
                    grad = remote.backward(self.client_id, reply)
                else:
                    reply = remote.step(self.client_id, acts)
                    grad = reply.grad
            except StepRefused as e:
                log.error("client %d, round %d: the server refused our activations: %s",
                          self.client_id, t, e)
                self._restore(self.snapshots[t])
                if aggregates_at(t, plan.steps, plan.interval):
                    self._catch_up(fed, t)
                self.round = t + 1
                continue
            self.client.backward(grad)
            self.history.append({"round": t, "loss": reply.loss, "tokens": reply.tokens,
                                 "bytes_up": remote.bytes_up, "bytes_down": remote.bytes_down,
                                 "latency_s": time.perf_counter() - sent})
            if aggregates_at(t, plan.steps, plan.interval):
                self.awaiting = t
                try:
                    merged = fed.aggregate(t, self.client.upload(), self.client.num_samples)
                except Refused as e:
                    log.warning("client %d, round %d: %s", self.client_id, t, e)
                    self._catch_up(fed, t)
                else:
                    self.client.load_adapter_state(merged)
                    self.agg_round = t
                self.awaiting = None
            self.round = t + 1

    def _catch_up(self, fed: RemoteFed, round: int) -> None:
        """Take the aggregate of ``round`` (which this client had no part in)."""
        got = fed.latest(self.client.adapter_state(), round, self.net.step_timeout_s)
        if got is not None:
            self.client.load_adapter_state(got[1])
            self.agg_round = got[0]

    def _sync(self, welcome: pb.Welcome, fed: RemoteFed) -> None:
        """Bring the client to the start of the round the server admits it at."""
        r = welcome.round
        for stale in [k for k in self.snapshots if k > r]:
            del self.snapshots[stale]
        if r in self.snapshots:
            self._restore(self.snapshots[r])
        elif self.awaiting is not None and self.awaiting == r - 1:
            self._catch_up(fed, r - 1)  # we finished round r-1 but missed its aggregate
            self.awaiting = None
        else:
            if self.client.pending is not None and self.round in self.snapshots:
                # The stream dropped between our forward and its gradient: go back to the
                # start of that round, as if we had missed it (batch, RNG, optimizer).
                self._restore(self.snapshots[self.round])
            if r != self.round:
                log.warning("client %d rejoins at round %d after local round %d: it takes "
                            "the latest aggregate and goes on from there", self.client_id, r,
                            self.round)
            got = fed.latest(self.client.adapter_state(), self.agg_round + 1, 0.0)
            if got is not None:
                self.client.load_adapter_state(got[1])
                self.agg_round = got[0]
        self.round = r

    def _begin(self, round: int) -> None:
        if round in self.snapshots:
            return
        snap = Snapshot(round, self.client.adapter_state(),
                        copy.deepcopy(self.client.optimizer.state_dict()), self._stream.drawn,
                        torch.get_rng_state(), self.agg_round, self.client.privacy_state())
        self.snapshots[round] = snap
        for old in [k for k in self.snapshots if k <= round - self.KEEP]:
            del self.snapshots[old]
        if self.checkpoint is not None:
            atomic_save({"snapshot": vars(snap)}, self.checkpoint)

    def _restore(self, snap: Snapshot) -> None:
        self._stream = _CountingStream(self.party.stream, snap.drawn)
        self.client = self.party.build(self.device, self._stream)
        self.client.load_adapter_state(snap.adapter)
        self.client.optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
        torch.set_rng_state(snap.rng)
        if snap.privacy is not None:
            self.client.load_privacy_state(snap.privacy)
        self.round, self.agg_round, self.awaiting = snap.round, snap.agg_round, None
