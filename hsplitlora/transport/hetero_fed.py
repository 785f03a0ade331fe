"""A fed server of the heterogeneous modes in its own process, so the main server never
holds an individual client's adapter.

HSplitLoRA's aggregation (and HetLoRA's, FlexLoRA's, FLoRA's) works on *participants*:
client ``i``'s adapters joined with its server-side copy's, which only the main server
holds. So each aggregation round is a rendezvous here: the main server sends, in one
``combine`` blob, every participant's plan (cut and ranks) and server-side adapter, and
tells each client to upload its own adapter here (``upload`` call); once every expected
client has uploaded (or ``timeout_s`` has passed: the late are left out and the weights
renormalise), the round is combined with the very function the simulation uses
(:func:`~hsplitlora.train.hetero.combine`) and only the result goes back to the main
server: the update to merge (noise-free, stacking) or each participant's new adapter
(SVD, zero-padding, FedAvg), all functions of the aggregate. Clients get an empty
acknowledgement. The main server distributes the result exactly as it does when it
aggregates itself, so a run with this fed server is bit-identical to one without.

The service keeps nothing between rounds (the run's state lives in the main server's
checkpoint), so a restarted fed server simply serves the next round.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from hsplitlora import aggregate as agg
from hsplitlora.models.lora import adapter_shapes
from hsplitlora.models.split import ArchSpec
from hsplitlora.models.structure import client_blocks
from hsplitlora.modes import MERGING
from hsplitlora.roles.messages import nbytes
from hsplitlora.train.hetero import Contribution, PerParticipant, combine
from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport import hsplitlora_pb2_grpc as pb_grpc
from hsplitlora.transport.calls import (
    pack_updates,
    settings_from_json,
    settings_to_json,
    unpack_updates,
)
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.plan import widest_adapter_bytes
from hsplitlora.transport.rounds import opened_round
from hsplitlora.transport.security import call_metadata, explain, open_channel
from hsplitlora.transport.validate import Layout, check_finite
from hsplitlora.transport.wire import (
    Reassembler,
    WireError,
    frames,
    pack,
    read_header,
    unpack,
)

__all__ = ["HeteroFedService", "RemoteFedAggregation"]

log = logging.getLogger(__name__)
# the key prefix of the global model in a non-merging aggregation result (beside "<id>/")
GLOBAL = "global"

State = dict[str, torch.Tensor]


@dataclass
class _Round:
    layouts: dict[int, Layout]  # each expected client's adapter
    weights: dict[int, int]
    server: dict[int, State]  # each participant's server-side adapter
    opened: float
    received: dict[int, State] = field(default_factory=dict)
    done: bool = False


def _split(tensors: Mapping[str, torch.Tensor], what: str) -> dict[int, State]:
    """``{"<id>/<name>": t}`` -> ``{id: {name: t}}``."""
    out: dict[int, State] = {}
    for key, t in tensors.items():
        cid, sep, name = key.partition("/")
        if not sep or not cid.isdigit():
            raise WireError(f"{what}: tensor {key!r} is not named '<client id>/<name>'")
        out.setdefault(int(cid), {})[name] = t
    return out


class HeteroFedService:
    """Aggregation rounds of a heterogeneous run: client uploads meet the main server's
    ``combine`` request; thread-safe (one gRPC call per party)."""

    def __init__(self, aggregator: str, alpha: float, shapes: Mapping[str, tuple[int, int]],
                 spec: ArchSpec, timeout_s: float, last_round: int,
                 ranks: Sequence[int] = ()) -> None:
        self.aggregator, self.alpha = aggregator, alpha
        self.shapes, self.spec = dict(shapes), spec
        # the largest upload a client may send: its widest possible adapter (``ranks``:
        # every rank a plan may give; none known, net.max_tensor_mb's limit applies)
        self.upload_bytes = widest_adapter_bytes(self.shapes, spec, ranks) if ranks else None
        self.blocks = 1 + max((spec.block_of(m) for m in self.shapes), default=-1)
        self.timeout_s = timeout_s
        self.last_round = last_round
        self.finished = threading.Event()  # the main server says the run is over
        self._rounds: dict[int, _Round] = {}
        self._cond = threading.Condition()

    # -- the clients' side ---------------------------------------------------------------
    def layout_for(self, round: int, client_id: int) -> Layout:
        """The adapter client ``client_id`` must upload for ``round``: its plan's, from
        the main server's request (waited for, up to ``timeout_s``)."""
        r = self._opened(round)
        if r.done or client_id not in r.layouts:
            raise LookupError(f"client {client_id} has no part in aggregation round {round} "
                              "(the main server did not list it, or the round is over)")
        return r.layouts[client_id]

    def submit(self, round: int, client_id: int, state: State, num_samples: int) -> bytes:
        """Add one client's adapter (``num_samples`` is the main server's figure, which
        the weights use); return once the round is combined, with an acknowledgement."""
        with self._cond:
            r = self._rounds.get(round)
            if r is None or r.done or client_id not in r.layouts:
                raise LookupError(f"client {client_id} has no part in aggregation round "
                                  f"{round} (or the round is over)")
            r.received[client_id] = state
            self._cond.notify_all()
            while not r.done:
                self._cond.wait()
        return pack({}, {"round": str(round)})

    def latest(self, min_round: int, wait_s: float) -> None:
        """No aggregate to fetch: the main server brings a rejoining client up to date."""
        return None

    def open(self, round: int, client_ids: list[int]) -> None:
        """Only the end of the run comes this way (``round`` past the last)."""
        if round > self.last_round:
            self.finished.set()

    # -- the main server's side ----------------------------------------------------------
    def combine(self, round: int, blob: bytes) -> bytes:
        """Open ``round`` with the main server's request, wait for the clients' adapters
        (up to ``timeout_s``), combine, and return the result packed."""
        r = self._open(round, blob)
        with self._cond:
            while set(r.received) < set(r.layouts):
                if self._rounds.get(round) is not r:
                    raise WireError(f"aggregation round {round} was opened again (the main "
                                    "server restarted); this request is void")
                remaining = r.opened + self.timeout_s - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            ids = sorted(r.received)
            late = sorted(set(r.layouts) - set(r.received))
            r.done = True
            self._cond.notify_all()
            received, r.received = r.received, {}
            for old in [k for k in self._rounds if k < round - 2]:
                del self._rounds[old]
        if late:
            log.warning("aggregation round %d: no adapter from client(s) %s within %g s; "
                        "combining the %d present", round, late, self.timeout_s, len(ids))
        meta = {"round": str(round), "clients": ",".join(map(str, ids))}
        if not ids:
            return pack({}, {**meta, "bytes_up": "0"})
        states = [agg.from_peft_state_dict({**received[i], **r.server[i]}, self.alpha)
                  for i in ids]
        up = sum(nbytes(received[i]) + nbytes(r.server[i]) for i in ids)
        result = combine(self.aggregator, states, [r.weights[i] for i in ids])
        log.info("aggregation round %d (%s): clients %s", round, self.aggregator, ids)
        if self.aggregator in MERGING:
            tensors = pack_updates(result)  # type: ignore[arg-type]
        else:  # each participant's adapter, and the method's global model
            outputs, glob = result.outputs, result.glob  # type: ignore[union-attr]
            tensors = {f"{i}/{k}": v for i, out in zip(ids, outputs, strict=True)
                       for k, v in agg.to_peft_state_dict(out).items()}
            tensors.update({f"{GLOBAL}/{k}": v for k, v in agg.to_peft_state_dict(glob).items()})
            meta["global_alpha"] = json.dumps({m: p.alpha for m, p in glob.items()})
        return pack(tensors, {**meta, "bytes_up": str(up)})

    def _open(self, round: int, blob: bytes) -> _Round:
        what = f"combine request of round {round}"
        header = read_header(blob)
        try:
            parties = {int(k): v for k, v in json.loads(header.meta["parties"]).items()}
        except (KeyError, ValueError, AttributeError) as e:
            raise WireError(f"{what}: metadata 'parties' is malformed ({e!r})") from None
        server = _split(unpack(blob), what)
        check_finite({k: v for s in server.values() for k, v in s.items()}, what)
        layouts, weights = {}, {}
        for cid, p in parties.items():
            try:
                cut, n, tail = int(p["cut"]), int(p["num_samples"]), int(p.get("tail", 0))
            except (KeyError, TypeError, ValueError) as e:
                raise WireError(f"{what}: party {cid} is malformed ({e!r})") from None
            if (not 0 <= cut <= self.blocks or n < 1 or tail < 0
                    or (tail and cut + tail >= self.blocks)):
                raise WireError(f"{what}: party {cid} has cut {cut}, tail {tail} and {n} "
                                "samples")
            own = set(client_blocks(cut, tail, self.blocks))  # a U-shaped client's tail too
            held = {m: s for m, s in self.shapes.items() if self.spec.block_of(m) in own}
            settings = settings_from_json(p.get("settings") or {})
            layouts[cid] = {k: ("F32", s) for k, s in adapter_shapes(
                held, settings, self.spec.default_targets).items()}
            weights[cid] = n
        if set(server) - set(parties):
            raise WireError(f"{what}: server-side adapters of clients "
                            f"{sorted(set(server) - set(parties))}, which it does not list")
        r = _Round(layouts, weights, {cid: server.get(cid, {}) for cid in parties},
                   time.monotonic())
        with self._cond:
            stale = self._rounds.get(round)
            if stale is not None:  # a resumed main server redoes the round: release it
                stale.done = True
            self._rounds[round] = r
            self._cond.notify_all()
        return r

    def _opened(self, round: int) -> _Round:
        with self._cond:
            return opened_round(self._cond, self._rounds, round, self.timeout_s)


def combine_call(service: Any, requests: Iterator[pb.Chunk], net: NetConfig,
                 context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
    """The ``Combine`` RPC: one request blob in, the result blob out."""
    if not isinstance(service, HeteroFedService):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this fed server runs a "
                      "homogeneous mode: it aggregates client adapters only (check that "
                      "both use the same config)")
    assembler = Reassembler(net.max_tensor_bytes)
    for chunk in requests:
        blob = assembler.feed(chunk)
        if blob is not None:
            break
    else:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended before the whole "
                      "combine request arrived")
    try:
        if blob.kind != "combine":
            raise WireError(f"expected a 'combine' blob, got {blob.kind!r}")
        result = service.combine(blob.round, blob.data)
    except WireError as e:
        log.warning("refused a combine request: %s", e)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    yield from frames(result, "combined", blob.round, 0, net.chunk_bytes)


class RemoteFedAggregation:
    """The main server's side: a :class:`~hsplitlora.train.hetero.FedAggregation` that
    asks the clients to upload to the fed server at ``address`` and sends it the rest."""

    def __init__(self, address: str, net: NetConfig, token: str | None, *, aggregator: str,
                 alpha: float, shapes: Mapping[str, tuple[int, int]], tail: int = 0) -> None:
        self.address, self.net = address, net
        self.aggregator, self.alpha, self.shapes = aggregator, alpha, dict(shapes)
        self.tail = tail  # every client's (train.tail): its adapters cover its tail too
        self._channel = open_channel(address, net)
        self._stub = pb_grpc.FederationStub(self._channel)
        self._token = token

    def _meta(self, method: str) -> tuple[tuple[str, str], ...]:
        return call_metadata("server", self._token, method, self.net)

    def combine(self, round: int, parties: Mapping[int, Contribution]
                ) -> tuple[list[int], Any, int]:
        asked = {cid: p for cid, p in parties.items() if p.client.upload(round)}
        if not asked:
            return [], None, 0
        request = pack(
            {f"{cid}/{k}": v for cid, p in asked.items() for k, v in p.server_state.items()},
            {"parties": json.dumps({cid: {"cut": p.cut, "tail": self.tail,
                                          "num_samples": p.num_samples,
                                          "settings": settings_to_json(p.settings)}
                                    for cid, p in asked.items()})})
        try:
            stream = self._stub.Combine(
                frames(request, "combine", round, 0, self.net.chunk_bytes),
                metadata=self._meta("Combine"),
                timeout=self.net.step_timeout_s + self.net.reply_timeout_s)
            assembler = Reassembler(self.net.max_tensor_bytes)
            blob = next((b for b in map(assembler.feed, stream) if b is not None), None)
        except grpc.RpcError as e:
            raise explain(e, self.address, self.net) from None
        what = f"aggregation result of round {round} from the fed server at {self.address}"
        if blob is None or blob.kind != "combined":
            raise WireError(f"{what}: none arrived")
        return self._read(blob.data, asked, what)

    def _read(self, data: bytes, asked: Mapping[int, Contribution],
              what: str) -> tuple[list[int], Any, int]:
        """The result, checked: only clients that were asked, finite values, and the
        names and shapes each participant's adapter (or the update) must have."""
        header = read_header(data)
        text = header.meta.get("clients", "")
        ids = [int(x) for x in text.split(",") if x.isdigit()]
        if sorted(set(ids) - set(asked)) or ",".join(map(str, ids)) != text:
            raise WireError(f"{what}: clients {text!r} are not a subset of {sorted(asked)}")
        tensors = unpack(data)
        check_finite(tensors, what)
        up = int(header.meta.get("bytes_up", "0"))
        if self.aggregator in MERGING:
            return ids, unpack_updates(tensors, self.shapes, what), up
        prefix = f"{GLOBAL}/"
        glob_flat = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            alphas = {m: float(a) for m, a in
                      json.loads(header.meta.get("global_alpha", "{}")).items()}
            glob = agg.from_peft_state_dict(glob_flat, alphas) if glob_flat else {}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise WireError(f"{what}: the global model is malformed ({e!r})") from None
        outs = _split({k: v for k, v in tensors.items() if not k.startswith(prefix)}, what)
        result = {}
        for cid in ids:
            p = asked[cid]
            want = {**p.layout, **{k: tuple(v.shape) for k, v in p.server_state.items()}}
            got = {k: tuple(v.shape) for k, v in outs.get(cid, {}).items()}
            if got != want:
                raise WireError(f"{what}: client {cid}'s adapter has tensors {got}, expected "
                                f"{want}")
            result[cid] = agg.from_peft_state_dict(outs[cid], self.alpha)
        return ids, PerParticipant(result, glob), up

    def finish(self, last_round: int) -> None:
        """Tell the fed server the run is over (it may be gone already)."""
        try:
            self._stub.Open(pb.RoundOpen(round=last_round + 1), metadata=self._meta("Open"),
                            timeout=self.net.reply_timeout_s)
        except grpc.RpcError as e:
            log.warning("could not tell the fed server the run is over: %s", e.details())
        self._channel.close()
