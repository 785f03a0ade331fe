"""Recipes for the role objects of a run: what each party needs, and nothing more.

A recipe holds one party's share of a prepared run (its segment or model copy, its own
batch stream, its optimizer settings) and builds the role on the device it is given. The
in-process run builds every role right here; the Ray backend ships each recipe to its
actor and builds the role there; a ``hsplitlora join`` process builds its client from the
same recipe. One construction path is what makes all of them step for step identical.
Recipes pickle (batch streams are :class:`~hsplitlora.runtime.batches.BatchStream` objects,
not generators), which is what lets them travel to an actor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from hsplitlora.data.tokenize import pad_id_for
from hsplitlora.models.lora import LoraSettings, attach_lora
from hsplitlora.models.shared import share_frozen
from hsplitlora.models.split import ClientSegment, ServerSegment, split_model, split_u
from hsplitlora.privacy.config import PrivacyConfig
from hsplitlora.roles.client import Client
from hsplitlora.roles.fedserver import FedServer
from hsplitlora.roles.learner import Learner
from hsplitlora.roles.server import MainServer
from hsplitlora.runtime.batches import BatchStream, batch_stream
from hsplitlora.runtime.optim import OptimSettings
from hsplitlora.train.prepared import Prepared

if TYPE_CHECKING:
    from hsplitlora.config import RunConfig

__all__ = ["Batches", "ClientRecipe", "HeteroServerRecipe", "LearnerRecipe", "ServerRecipe",
           "client_recipes", "fed_server", "hetero_client_recipe", "hetero_segments",
           "learner_recipes", "optim_settings", "party_seed", "probe_stream", "server_recipe",
           "shard_stream", "split_segments"]

Batches = Iterator[dict[str, torch.Tensor]]


def party_seed(seed: int, client_id: int) -> int:
    """Data-order seed of one party; the centralized learner uses client 0's, so a
    one-client split run draws the very same batches."""
    return seed * 1009 + client_id


def optim_settings(cfg: RunConfig, total_steps: int) -> OptimSettings:
    """One party's AdamW and schedule from ``cfg.train``, over ``total_steps`` of its own."""
    t, h = cfg.train, cfg.hetero
    tail = ({"tail_gamma": h.prune_gamma, "tail_lambda": h.prune_lambda}
            if cfg.mode.self_pruning else {})  # HetLoRA's regulariser of its trailing ranks
    return OptimSettings(lr=t.lr, weight_decay=t.weight_decay, eps=t.adam_eps,
                         warmup_steps=t.warmup_steps, total_steps=total_steps,
                         schedule=t.schedule, grad_clip=t.grad_clip, **tail)


@dataclass(kw_only=True)
class ClientRecipe:
    client_id: int
    segment: ClientSegment
    batches: BatchStream
    num_samples: int
    optim: OptimSettings
    precision: str
    compile: bool = False  # train.compile
    probes: BatchStream | None = None  # importance-probe batches (heterogeneous runs)
    # The LoRA the segment carries (heterogeneous runs), so a party elsewhere can rebuild
    # the very same segment from its own copy of the base model.
    settings: LoraSettings | None = None
    tail: ServerSegment | None = None  # a U-shaped split's blocks [L - t, L) and head
    label_smoothing: float = 0.0  # the loss is the client's when it holds the tail
    privacy: PrivacyConfig | None = None  # clip and noise what it sends (privacy section)
    noise_seed: int = 0  # its noise streams', apart from every other party's

    def stream(self) -> BatchStream:
        """This client's batches from the first one (a rejoining client rebuilds it)."""
        return self.batches.restart()

    def build(self, device: torch.device | str, batches: Batches | None = None) -> Client:
        """The client, drawing from ``batches`` (default: its own stream)."""
        return Client(self.client_id, self.segment, batches or self.batches, self.num_samples,
                      self.optim, precision=self.precision, device=device, probes=self.probes,
                      compile=self.compile, tail=self.tail,
                      label_smoothing=self.label_smoothing, privacy=self.privacy,
                      noise_seed=self.noise_seed)


@dataclass(kw_only=True)
class LearnerRecipe:
    model: nn.Module
    batches: BatchStream
    num_samples: int
    optim: OptimSettings
    precision: str
    label_smoothing: float
    client_id: int | None = None
    compile: bool = False

    def build(self, device: torch.device | str) -> Learner:
        return Learner(self.model, self.batches, self.optim, precision=self.precision,
                       device=device, label_smoothing=self.label_smoothing,
                       client_id=self.client_id, num_samples=self.num_samples,
                       compile=self.compile)


@dataclass
class ServerRecipe:
    segment: ServerSegment
    num_clients: int
    optim: OptimSettings
    per_client: bool
    precision: str
    label_smoothing: float
    compile: bool = False

    def build(self, device: torch.device | str) -> MainServer:
        return MainServer(self.segment, range(self.num_clients), self.optim,
                          per_client=self.per_client, precision=self.precision, device=device,
                          label_smoothing=self.label_smoothing, compile=self.compile)


@dataclass
class HeteroServerRecipe:
    """The heterogeneous main server: each client served from its own cut, by a copy of
    its own or by a view of one shared server side."""

    segments: Mapping[int, ServerSegment]
    optim: OptimSettings
    precision: str
    label_smoothing: float
    compile: bool = False
    shared: bool = False  # the segments are views of one shared server side

    @property
    def per_client(self) -> bool:
        return not self.shared

    def build(self, device: torch.device | str) -> MainServer:
        return MainServer.heterogeneous(self.segments, self.optim, shared=self.shared,
                                        precision=self.precision, device=device,
                                        label_smoothing=self.label_smoothing,
                                        compile=self.compile)


def _stream(p: Prepared, features: Sequence[dict[str, list[int]]], seed: int) -> BatchStream:
    """Batches of ``features`` as the run draws every stream: ``train.batch_size``, the
    tokenizer's pad id, widths rounded to ``data.pad_to_multiple_of``."""
    return batch_stream(features, p.cfg.train.batch_size, seed, pad_id_for(p.tokenizer),
                        p.cfg.data.pad_to_multiple_of)


def shard_stream(p: Prepared, client_id: int) -> BatchStream:
    """Client ``client_id``'s batches over its own shard, seeded per party."""
    return _stream(p, p.shards[client_id].features, party_seed(p.cfg.train.seed, client_id))


def probe_stream(p: Prepared, client_id: int) -> BatchStream:
    """Client ``client_id``'s importance-probe batches: its own shard, a seed apart from
    training's so probing does not shift the training batches."""
    return _stream(p, p.shards[client_id].features,
                   party_seed(p.cfg.train.seed, client_id) + 7919)


def hetero_segments(base: nn.Module, cut: int, settings: LoraSettings, tail: int = 0
                    ) -> tuple[ClientSegment, ServerSegment, ServerSegment | None]:
    """One participant's client segment, server-side segment and, in a U-shaped split,
    the client's tail: ``base`` with ``settings``' adapters (seeded, so every process
    builds the same), cut at ``cut`` (and at ``L - tail``), over ``base``'s own frozen
    tensors."""
    model = attach_lora(share_frozen(base), settings)
    if tail:
        return split_u(model, cut, tail)
    return (*split_model(model, cut), None)


def hetero_client_recipe(p: Prepared, client_id: int, cut: int,
                         settings: LoraSettings) -> ClientRecipe:
    """A heterogeneous client's recipe for its plan (``cut``, ``settings``), as the
    in-process system builds it; a ``hsplitlora join`` process builds its own with it."""
    t = p.cfg.train
    segment, _, tail = hetero_segments(p.model, cut, settings, t.tail)
    return ClientRecipe(client_id=client_id, segment=segment, batches=shard_stream(p, client_id),
                        num_samples=len(p.shards[client_id]), optim=optim_settings(p.cfg, t.steps),
                        precision=t.precision, compile=t.compile,
                        probes=probe_stream(p, client_id), settings=settings, tail=tail,
                        label_smoothing=t.label_smoothing)


def split_segments(p: Prepared) -> tuple[ClientSegment, ServerSegment, ServerSegment | None]:
    """The run's segments at ``train.cut``: the client's, the main server's and, in a
    U-shaped split (``train.tail``), the client's tail."""
    t = p.cfg.train
    if t.tail:
        return split_u(p.model, t.cut, t.tail)
    return (*split_model(p.model, t.cut), None)


def client_recipes(p: Prepared, ids: Sequence[int] | None = None) -> list[ClientRecipe]:
    """Each client's recipe: its own client segment (and tail, its adapters over the
    shared frozen base), its shard, its optimizer."""
    t = p.cfg.train
    client_seg, _, tail = split_segments(p)
    ids = range(t.num_clients) if ids is None else ids
    return [ClientRecipe(client_id=cid, segment=share_frozen(client_seg),
                         batches=shard_stream(p, cid), num_samples=len(p.shards[cid]),
                         optim=optim_settings(p.cfg, t.steps), precision=t.precision,
                         compile=t.compile, label_smoothing=t.label_smoothing,
                         tail=None if tail is None else share_frozen(tail),
                         privacy=p.cfg.privacy,
                         noise_seed=2 * party_seed(t.seed, cid) + 1)  # odd: data seeds stay apart
            for cid in ids]


def server_recipe(p: Prepared) -> ServerRecipe:
    """The main server: SFL-V2's one shared server-side adapter (its schedule spans every
    client's steps), or SFL-V1's copy per client under ``splitfed``."""
    t, mode = p.cfg.train, p.cfg.mode
    _, server_seg, _ = split_segments(p)
    return ServerRecipe(server_seg, t.num_clients,
                        optim_settings(p.cfg, mode.server_steps(t.steps, t.num_clients)),
                        mode.server == "per_participant", t.precision, t.label_smoothing,
                        t.compile)


def learner_recipes(p: Prepared) -> list[LearnerRecipe]:
    """Centralized: one learner over the union of the shards, batches drawn with client 0's
    seed. Federated: one learner per client, each with its own adapters on the whole model
    (over the shared frozen base)."""
    t = p.cfg.train
    common = dict(precision=t.precision, label_smoothing=t.label_smoothing, compile=t.compile)
    if p.cfg.mode.schedule == "centralized":
        union = [f for shard in p.shards for f in shard.features]
        stream = _stream(p, union, party_seed(t.seed, 0))
        return [LearnerRecipe(model=p.model, batches=stream, num_samples=len(union),
                              optim=optim_settings(p.cfg, t.steps * t.num_clients), **common)]
    return [LearnerRecipe(model=share_frozen(p.model), batches=shard_stream(p, cid),
                          num_samples=len(p.shards[cid]), optim=optim_settings(p.cfg, t.steps),
                          client_id=cid, **common)
            for cid in range(t.num_clients)]


def fed_server(p: Prepared) -> FedServer:
    return FedServer(weighting=p.cfg.train.agg_weighting, alpha=p.lora.alpha,
                     parts=p.cfg.mode.trains)
