"""A client process of a heterogeneous run: it hosts the Client role the server drives.

The main server plans this client and runs the training loop
(:mod:`hsplitlora.transport.hub`); this process keeps the data shard and the client
segment, builds its :class:`~hsplitlora.roles.client.Client` from the plan it is sent
(from its own copy of the base model, exactly as the simulation builds it), runs each
method the server calls and answers those that return something. Everything that arrives
is checked first (names, shapes, dtypes, finite values); a call that fails is answered
with an error, which makes the server drop this client until it reconnects, after which
the server brings it up to date.

A U-shaped client (``train.tail``) also holds its tail and its labels: the server sends
it the middle's output at ``L - tail`` (``finish``) and it answers with the gradient there
(``tailgrad``); its importance probing takes the same two hops.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from hsplitlora.checkpoint import atomic_save, load_checkpoint
from hsplitlora.models.lora import base_weights, matrix_shapes
from hsplitlora.models.shared import set_delta
from hsplitlora.models.split import arch_spec, num_blocks
from hsplitlora.models.structure import client_blocks
from hsplitlora.roles.client import Client
from hsplitlora.roles.messages import Activations, ServerReply
from hsplitlora.train.parties import hetero_client_recipe, hetero_segments
from hsplitlora.train.prepared import Prepared
from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport.calls import Call, read_call, settings_from_json, unpack_updates
from hsplitlora.transport.client import Link, RunOver, keep_joining
from hsplitlora.transport.codec import decode, encode, encode_activations, wire_layout
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.fed import RemoteFed
from hsplitlora.transport.security import ConnectionFailed, Refused
from hsplitlora.transport.validate import check_finite, check_header
from hsplitlora.transport.wire import Blob, Header, WireError, pack, read_header, unpack

__all__ = ["RoleHost"]

log = logging.getLogger(__name__)

_MAX_PROBE_BATCHES = 10_000


class RoleHost:
    """Runs client ``client_id`` of a heterogeneous run against the main server at
    ``server`` until the run is over, reconnecting after a lost connection; returns the
    client's adapter at the end."""

    KEEP = 3  # snapshots of recent rounds: a resumed server is at most one round behind

    def __init__(self, p: Prepared, client_id: int, net: NetConfig, server: str, *,
                 token: str | None = None, device: torch.device | str = "cpu",
                 checkpoint: Path | None = None, resume: bool = False) -> None:
        t = p.cfg.train
        if not p.cfg.mode.planned:
            raise ValueError(f"RoleHost runs the heterogeneous modes, not {t.mode!r}")
        if not 0 <= client_id < t.num_clients:
            raise ValueError(f"client id {client_id} is out of range: the config has "
                             f"train.num_clients={t.num_clients} (ids 0..{t.num_clients - 1})")
        self.p = p
        self.client_id = client_id
        self.net = net
        self.address = server
        self.token = token
        self.device = torch.device(device)
        self.client: Client | None = None
        self.round = -1  # of the last call
        self._welcomed = False
        self._spec = arch_spec(p.model.config)
        self._blocks, self._tail = num_blocks(p.model.config), p.cfg.train.tail
        self._shapes = matrix_shapes(p.model, self._spec.targets)
        self._handlers: dict[str, Callable[[Link, Call], None]] = {
            "build": self._build, "forward": self._forward, "backward": self._backward,
            "finish": self._finish,
            "adapter_state": self._adapter_state, "load_adapter_state": self._load,
            "apply_update": self._apply_update, "reset_adapters": self._reset,
            "score": self._score, "snapshot": self._snapshot, "restore": self._restore,
            "upload": self._upload,
        }
        # This client's state as recent rounds ended (round -> cut and Client.state_dict),
        # the latest also on disk at ``checkpoint``, for a resumed server to send it back to.
        self.snapshots: dict[int, dict[str, Any]] = {}
        self.checkpoint = checkpoint
        if resume:
            if checkpoint is None:
                raise ValueError("resume needs the client's checkpoint path")
            snap = load_checkpoint(checkpoint)
            self.snapshots[snap["round"]] = snap
            log.info("client %d holds its snapshot of round %d", client_id, snap["round"])

    def run(self) -> dict[str, torch.Tensor]:
        return keep_joining(self._session, self.net, self.client_id, lambda: self._welcomed)

    def _session(self) -> dict[str, torch.Tensor]:
        self._welcomed = False
        t = self.p.cfg.train
        hello = pb.Hello(client_id=self.client_id, cut=-1,
                         num_samples=len(self.p.shards[self.client_id]), codec=self.net.codec,
                         mode=t.mode, tail=t.tail)
        link = Link(self.address, self.net, hello, self.token)
        try:
            try:
                welcome = link.welcome(self.net.join_timeout_s + self.net.reply_timeout_s)
            except RunOver:
                log.info("client %d: the run was already over", self.client_id)
                return self._final()
            self._welcomed = True
            log.info("client %d admitted at round %d", self.client_id, welcome.round)
            while True:
                got = link.receive(self.net.reply_timeout_s)
                if isinstance(got, pb.Control):
                    if got.kind == pb.Control.DONE:
                        log.info("client %d: run complete", self.client_id)
                        return self._final()
                    continue
                self._serve(link, got)
        finally:
            link.close()

    def _final(self) -> dict[str, torch.Tensor]:
        return self.client.adapter_state() if self.client is not None else {}

    def _serve(self, link: Link, blob: Blob) -> None:
        self.round = blob.round
        method = "?"
        try:
            if blob.kind != "call":
                raise WireError(f"expected a call, got a {blob.kind!r} blob")
            call = read_call(blob.data)
            method = call.method
            handler = self._handlers.get(method)
            if handler is None:
                raise WireError(f"unknown method {method!r}; server and client must run the "
                                "same hsplitlora version")
            if method != "build" and self.client is None:
                raise WireError(f"{method} before the client was built")
            handler(link, call)
        except ConnectionFailed:
            raise
        except (WireError, ValueError, KeyError, RuntimeError) as e:
            log.error("client %d, round %d: call %s failed: %s", self.client_id, blob.round,
                      method, e)
            link.send("error", blob.round, pack({}, {"message": f"{method}: {e}"}))

    # -- the calls -----------------------------------------------------------------------
    def _build(self, link: Link, call: Call) -> None:
        cut = int(call.args["cut"])
        settings = settings_from_json(call.args["settings"])
        if self.client is None:
            recipe = hetero_client_recipe(self.p, self.client_id, cut, settings)
            self._load_base([recipe.segment, recipe.tail], call.tensors, cut,
                            int(call.args["version"]))
            self.client = recipe.build(self.device)
        else:  # a re-plan moved the cut: a new head, the same tail
            segment, _, _ = hetero_segments(self.p.model, cut, settings, self._tail)
            self._load_base([segment], call.tensors, cut, int(call.args["version"]))
            self.client.replace_segment(segment)
            self.client.reset_adapters(settings)
        log.info("client %d runs blocks [0, %d)", self.client_id, cut)

    def _held(self, cut: int) -> dict[str, tuple[int, int]]:
        """The adaptable matrices of the blocks this client runs at ``cut`` (and its tail)."""
        own = set(client_blocks(cut, self._tail, self._blocks))
        return {m: s for m, s in self._shapes.items() if self._spec.block_of(m) in own}

    def _load_base(self, segments: list[Any], deltas: Mapping[str, torch.Tensor],
                   cut: int, version: int) -> None:
        """What the server says was merged into the base weights of freshly built
        segments' blocks (as of merge ``version``), added to this process's own pristine
        weights. A tail that is kept across a re-plan already holds its merges."""
        held = self._held(cut)
        check_finite(deltas, "merged base updates")
        weights = {}
        for segment in segments:
            if segment is not None:
                weights.update(base_weights(segment, list(held)))
        checked = {}
        for name, value in deltas.items():
            module = name.removesuffix(".weight")
            if module not in held:
                raise WireError(f"merged update {name!r} is not a matrix of the blocks this "
                                f"client runs (cut {cut}, tail {self._tail})")
            if module not in weights:  # the kept tail's
                continue
            weight = weights[module]
            if value.shape != weight.shape or value.dtype != torch.float32:
                raise WireError(f"merged update {name!r}: {value.dtype} {tuple(value.shape)}, "
                                f"expected torch.float32 {tuple(weight.shape)}")
            checked[module] = (weight, value)
        for weight, value in checked.values():
            set_delta(weight, value, version)

    def _forward(self, link: Link, call: Call) -> None:
        assert self.client is not None
        acts = self.client.forward()
        link.send("reply", self.round, pack(encode_activations(acts, self.net.codec)))

    def _finish(self, link: Link, call: Call) -> None:
        """A U-shaped step's middle hop: the server's activations at ``L - tail`` go
        through the tail and the loss here; their gradient (with the loss and target
        tokens, for the server's records) goes back."""
        assert self.client is not None
        pending = self.client.pending
        if pending is None or not self.client.holds_tail:
            raise WireError("the middle's activations arrived with no U-shaped forward pending")
        returned = self._tensor("mid", call.header, call.tensors, pending,
                                f"middle activations of round {self.round}")
        reply = self.client.finish(returned)
        link.send("tailgrad", self.round, pack(encode("tailgrad", reply.grad, self.net.codec),
                                               {"loss": repr(reply.loss),
                                                "tokens": str(reply.tokens)}))

    def _gradient(self, header: Header, wire: Mapping[str, torch.Tensor], like: torch.Tensor,
                  what: str) -> torch.Tensor:
        """A gradient for ``like`` (the activations it answers), checked first."""
        return self._tensor("grad", header, wire, like, what)

    def _tensor(self, name: str, header: Header, wire: Mapping[str, torch.Tensor],
                like: torch.Tensor, what: str) -> torch.Tensor:
        """Tensor ``name`` shaped as ``like`` (a gradient for it, or a middle's output of
        the same shape), checked first."""
        layout = wire_layout(name, self.net.codec, like.dtype, tuple(like.shape))
        check_header(header, layout, {}, what)
        check_finite(wire, what)
        return decode(wire, name, self.net.codec, like.dtype)

    def _backward(self, link: Link, call: Call) -> None:
        assert self.client is not None
        pending = self.client.pending
        if pending is None:
            raise WireError("a gradient arrived with no forward pass pending")
        self.client.backward(self._gradient(call.header, call.tensors, pending,
                                            f"gradient of round {self.round}"))

    def _adapter_state(self, link: Link, call: Call) -> None:
        assert self.client is not None
        link.send("reply", self.round, pack(self.client.adapter_state()))

    def _load(self, link: Link, call: Call) -> None:
        assert self.client is not None
        check_finite(call.tensors, "adapter state")
        self.client.load_adapter_state(call.tensors)

    def _apply_update(self, link: Link, call: Call) -> None:
        assert self.client is not None
        updates = unpack_updates(call.tensors, self._held(self.client.cut),
                                 f"aggregated update of round {self.round}")
        self.client.apply_update(updates, settings_from_json(call.args["settings"]),
                                 int(call.args["version"]))

    def _reset(self, link: Link, call: Call) -> None:
        assert self.client is not None
        self.client.reset_adapters(settings_from_json(call.args["settings"]))

    def _upload(self, link: Link, call: Call) -> None:
        """Send this client's adapter to the fed server (``net.fed_address``) for the
        round's aggregation; the main server never sees it. The result comes from the
        main server, like every other change to this client's state."""
        assert self.client is not None
        r = int(call.args["round"])
        address = self.net.fed_address
        if address is None:
            raise WireError("upload: net.fed_address is not set in this client's config; "
                            "give every party the same config")
        fed = RemoteFed(address, self.net, str(self.client_id), self.token)
        try:
            fed.aggregate(r, self.client.adapter_state(), self.client.num_samples, reply={})
        except (ConnectionFailed, Refused) as e:
            raise WireError(f"upload to the fed server at {address} failed: {e}") from None
        finally:
            fed.close()

    def _snapshot(self, link: Link, call: Call) -> None:
        """Keep this client's state as round ``round`` ends (on disk too), then answer:
        the server writes its own checkpoint of that round only after every answer."""
        assert self.client is not None
        r = int(call.args["round"])
        snap = {"round": r, "cut": self.client.cut, "state": self.client.state_dict()}
        self.snapshots[r] = snap
        for old in [k for k in self.snapshots if k <= r - self.KEEP]:
            del self.snapshots[old]
        if self.checkpoint is not None:
            atomic_save(snap, self.checkpoint)
        link.send("reply", self.round, pack({}, {"round": str(r)}))

    def _restore(self, link: Link, call: Call) -> None:
        """Go back to the snapshot of round ``round`` (the server resumed from its
        checkpoint of that round). Without it the client goes on from the adapters the
        server just sent, with a fresh optimizer: the run continues, though no longer
        exactly as an uninterrupted one would."""
        assert self.client is not None
        r = int(call.args["round"])
        snap = self.snapshots.get(r)
        if snap is None or snap["cut"] != self.client.cut:
            log.warning("client %d holds no snapshot of round %d (it has %s): it goes on "
                        "from the server's adapters with a fresh optimizer", self.client_id,
                        r, sorted(self.snapshots) or "none")
            return
        try:
            self.client.load_state_dict(snap["state"])
        except (ValueError, KeyError, RuntimeError) as e:  # not this plan's: keep what we have
            log.warning("client %d: its snapshot of round %d does not fit its plan (%s); it "
                        "goes on from the server's adapters", self.client_id, r, e)
            return
        log.info("client %d is back at the end of round %d", self.client_id, r)

    def _score(self, link: Link, call: Call) -> None:
        assert self.client is not None
        n = int(call.args["n"])
        if not 1 <= n <= _MAX_PROBE_BATCHES:
            raise WireError(f"score: {n} probe batches is outside [1, {_MAX_PROBE_BATCHES}]")

        scores = self.client.score(n, _NetworkProbe(self, link))
        link.send("reply", self.round, pack({}, {"scores": json.dumps(scores)}))



class _NetworkProbe:
    """The main server's side of importance probing, over this client's link: one round
    trip per batch (``probe`` up, ``probe_grad`` down), or a U-shaped client's two
    (``probe`` up, ``probe_mid`` down, ``probe_tailgrad`` up, ``probe_grad`` down)."""

    def __init__(self, host: RoleHost, link: Link) -> None:
        self.host, self.link = host, link
        self._sent: torch.Tensor | None = None  # a U-shaped probe's activations at the cut

    def reply(self, acts: Activations) -> ServerReply:
        self._send("probe", encode_activations(acts, self.host.net.codec))
        header, wire = self._receive("probe_grad")
        grad = self.host._gradient(header, wire, acts.hidden, self._what("probe_grad"))
        return ServerReply(float(header.meta.get("loss", "nan")),
                           int(header.meta.get("tokens", "0")), grad)

    def forward(self, acts: Activations) -> torch.Tensor:
        self._send("probe", encode_activations(acts, self.host.net.codec))
        self._sent = acts.hidden
        header, wire = self._receive("probe_mid")
        return self.host._tensor("mid", header, wire, acts.hidden, self._what("probe_mid"))

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        sent, self._sent = self._sent, None
        if sent is None:
            raise WireError("probing: a tail's gradient before the middle's activations")
        self._send("probe_tailgrad", encode("tailgrad", grad, self.host.net.codec))
        header, wire = self._receive("probe_grad")
        return self.host._gradient(header, wire, sent, self._what("probe_grad"))

    def _send(self, kind: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self.link.send(kind, self.host.round, pack(tensors))

    def _receive(self, kind: str) -> tuple[Header, dict[str, torch.Tensor]]:
        got = self.link.receive(self.host.net.reply_timeout_s)
        if isinstance(got, pb.Control) or got.kind != kind:
            raise WireError(f"{self._what(kind)}: got {got!r} instead")
        return read_header(got.data), unpack(got.data)

    def _what(self, kind: str) -> str:
        return f"{kind} of round {self.host.round}"
