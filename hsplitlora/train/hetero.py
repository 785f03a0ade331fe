"""Heterogeneous split federated training: HSplitLoRA and the heterogeneous-LoRA baselines.

Every client ``i`` has its own plan: a cut ``k_i`` and a rank per candidate matrix (0 = no
adapter). The main server keeps one server-side copy per client, holding blocks
``[k_i, L)`` (SFL-V1 style: with different cuts there is no single server-side model to
share). Client ``i`` together with its server-side copy is one *participant* whose
adapters cover every block, so a block that is client-side for some clients and
server-side for others is trained in both places and aggregated as one weight.

Aggregation, every ``I`` local steps, over the participants' adapters (weights: shard sizes):

* merging methods, ``noisefree`` (HSplitLoRA) and ``stack`` (FLoRA): the exact weighted sum
  of every participant's ``scale * B A`` is merged into the base weights, once per
  process (every party of a process shares that process's frozen base:
  :mod:`hsplitlora.models.shared`; a remote client merges into its own), and adapters
  restart at each participant's planned rank. Only the stacked factors travel (or the
  dense update, when it is smaller).
* ``svd`` (FlexLoRA), ``zeropad`` (HetLoRA), ``fedavg`` (homogeneous ranks only): the
  method's per-participant adapters are loaded back; base weights never change. The
  method's global model is kept beside them: FlexLoRA's exact weighted update (stacked
  factors), HetLoRA's rank-``r_max`` global adapter (which every participant starts from,
  truncated to its ranks, and which may self-prune its trailing ranks: :class:`SelfPruning`).

One optimizer policy for every aggregator: after an aggregation each participant's AdamW
starts afresh (moments of the adapters it had mean nothing for the ones it gets back),
the learning-rate schedule going on where it was.

A re-plan (new cuts or ranks) is only possible right after a merging aggregation, when the
learned update lives in the base weights and the adapters are fresh anyway.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from hsplitlora import aggregate as agg
from hsplitlora.checkpoint import trusted_types
from hsplitlora.models.lora import (
    LoraSettings,
    adapter_shapes,
    base_weights,
    matrix_shapes,
    merge_base_update,
    target_module_names,
)
from hsplitlora.models.shared import merged_delta, restore_original
from hsplitlora.models.split import arch_spec, num_blocks, server_view
from hsplitlora.models.structure import client_blocks
from hsplitlora.modes import MERGING, SHARED_SIDE
from hsplitlora.roles.client import Update
from hsplitlora.roles.messages import nbytes
from hsplitlora.runtime.batches import BatchStream
from hsplitlora.runtime.optim import OptimSettings
from hsplitlora.train.engine import Attendance, Parallel, client_step, everyone, run_rounds
from hsplitlora.train.parties import ClientRecipe, HeteroServerRecipe, hetero_segments
from hsplitlora.train.placement import InProcess, PartyLost, Placement
from hsplitlora.train.recorder import Recorder

__all__ = ["AGGREGATORS", "Contribution", "FedAggregation", "HeteroSystem",
           "PartyPlan", "PerParticipant", "SelfPruning", "Traffic", "Unmerged", "combine",
           "prune_states", "run_hetero"]

log = logging.getLogger(__name__)

AGGREGATORS = ("noisefree", "stack", "svd", "zeropad", "fedavg")


@dataclass(frozen=True)
class PartyPlan:
    """One participant's configuration: its cut and the rank of each adapted matrix."""

    cut: int
    ranks: Mapping[str, int] = field(default_factory=dict)  # full module name -> rank (>0)

    def settings(self, targets: tuple[str, ...], candidates: Sequence[str], alpha: float,
                 dropout: float, init_seed: int | None = None) -> LoraSettings:
        ranks = {m: int(self.ranks.get(m, 0)) for m in candidates}
        top = max(ranks.values(), default=0)
        return LoraSettings(r=max(top, 1), alpha=alpha, dropout=dropout,
                            targets=targets, ranks=ranks, init_seed=init_seed)


@dataclass(frozen=True)
class SelfPruning:
    """HetLoRA's rank self-pruning, at each aggregation, of each participant's matrices
    (docs/hsplitlora.md, Baselines): keep ``floor(gamma * r)`` ranks when the others'
    share of the update is below ``threshold``."""

    gamma: float = 0.9
    threshold: float = 0.05


# what checkpoints hold besides tensors and containers
trusted_types([PartyPlan, agg.LoraPair])


class HeteroSystem:
    """Builds and holds the clients and the heterogeneous main server for a set of plans."""

    def __init__(
        self,
        base: nn.Module,
        plans: Sequence[PartyPlan],
        streams: Sequence[BatchStream],
        num_samples: Sequence[int],
        *,
        client_optim: OptimSettings,
        server_optim: OptimSettings,
        alpha: float,
        dropout: float = 0.0,
        aggregator: str = "noisefree",
        precision: str = "bf16",
        compile: bool = False,
        device: torch.device | str = "cpu",
        label_smoothing: float = 0.0,
        federated: bool = False,
        place: Placement | None = None,
        seed: int = 0,
        probes: Sequence[BatchStream] | None = None,
        pruning: SelfPruning | None = None,
        sparsity_weights: bool = True,
        shared_server: bool = False,
        tail: int = 0,
    ) -> None:
        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}; choose one of {AGGREGATORS}")
        if shared_server and aggregator not in SHARED_SIDE:
            raise ValueError(f"a shared server side needs an aggregator it can take part in "
                             f"({', '.join(sorted(SHARED_SIDE))}), not {aggregator!r}: "
                             "FedAvg averages factors of one rank, and a shared side holds "
                             "the largest rank of every block it serves")
        if tail and federated:
            raise ValueError("a U-shaped split (train.tail) needs a main server between the "
                             "client's cut and its tail: hetero.federated runs no server")
        if pruning is not None and aggregator != "zeropad":
            raise ValueError(f"rank self-pruning is HetLoRA's (aggregator zeropad), not "
                             f"{aggregator!r}'s")
        self.pruning = pruning
        # HetLoRA's weights: data share times the update's norm (its paper), or data alone
        self.sparsity_weights = sparsity_weights
        self.spec = arch_spec(base.config)
        self.base = base  # unsplit, no LoRA: the fed-level view of the merged base weights
        self.candidates = target_module_names(base, self.spec.targets)
        self.n_blocks = num_blocks(base.config)
        # U-shaped split: every client also keeps blocks [L - tail, L), the head and the loss
        self.tail = tail
        self.alpha, self.dropout, self.aggregator = alpha, dropout, aggregator
        self.seed = seed
        self.restarts = 0  # times the adapters restarted (merging aggregations, re-plans)
        # Federated: each client runs its server segment (norm + head) on its own device,
        # so nothing crosses the network per step; only adapters travel.
        self.federated = federated
        # Every merged update so far, in order: replayed over the pristine base they
        # rebuild the merged weights bit for bit, at the size of adapters, not of the model.
        self.merges: list[dict[str, Update]] = []
        # Non-merging methods: the global model of the latest aggregation, per matrix
        # (FlexLoRA: the exact weighted update as stacked factors; HetLoRA: the global
        # adapter at rank r_max, which is also what every participant starts from).
        self.global_model: dict[str, agg.LoraPair] = {}
        self.shapes = matrix_shapes(base, self.spec.targets)
        self.plans = list(plans)
        self.client_optim = client_optim
        # In process by default; the Ray backend places each client and the server in an
        # actor and hands back proxies with the same methods.
        place = place or InProcess(torch.device(device))
        place.watch_base(base)
        self.fed: FedAggregation | None = place.fed_aggregation()
        if aggregator == "zeropad" and self.fed is not None:
            raise ValueError("hetlora (aggregator zeropad) cannot run with a separate fed "
                             "server yet: its rank-r_max global adapter and the participants' "
                             "self-pruned ranks live with the main server; drop "
                             "net.fed_address")
        # One server-side adapter per block, trained on every client's batch that reaches
        # that block (SplitLoRA's shared server side, from each client's own cut), or one
        # server-side copy per participant (SFL-V1).
        self.shared_server = shared_server
        if shared_server and self.fed is not None:
            raise ValueError("a shared server side cannot run with a separate fed server "
                             "yet: its adapters are aggregated beside the clients' by range "
                             "of blocks; drop net.fed_address or use "
                             "hetero.server_side: per_participant")
        clients, segments = [], {}
        for cid, (plan, stream) in enumerate(zip(self.plans, streams, strict=True)):
            settings = self.settings(cid)
            client_seg, server_seg, tail_seg = hetero_segments(base, plan.cut, settings, tail)
            clients.append(place.place(ClientRecipe(
                client_id=cid, segment=client_seg, batches=stream, num_samples=num_samples[cid],
                optim=client_optim, precision=precision, compile=compile, settings=settings,
                probes=None if probes is None else probes[cid], tail=tail_seg,
                label_smoothing=label_smoothing), "client"))
            if not shared_server:  # a shared side is built once below: keep no copy per client
                segments[cid] = server_seg
        self.clients = clients
        if shared_server:
            segments = self._shared_segments()
        self.server = place.place(HeteroServerRecipe(segments, server_optim, precision,
                                                     label_smoothing, compile,
                                                     shared=shared_server), "server")
        place.started()
        # HetLoRA's global rank per matrix: the largest any participant starts with.
        self.r_max: dict[str, int] = {}
        # What setting the run up moved over the clients' links (HetLoRA's hand-out of
        # its global adapter), for the run's ``start`` event; None: nothing.
        self.start_traffic: Traffic | None = None
        if aggregator == "zeropad":
            self.start_traffic = self._start_from_global()

    def _start_from_global(self) -> Traffic:
        """HetLoRA: one global adapter per matrix at rank ``r_max`` (the first participant
        holding that rank lends its fresh A; B = 0), and every participant starts from its
        truncation, instead of from an A of its own. Every client uploads its fresh
        adapters and downloads its truncation: that traffic is returned."""
        states = self.participant_states()
        shared = ([part for part, _ in self._server_ranges(range(len(self.plans)))]
                  if self.shared_server else [])
        for state in states + shared:
            for m, pair in state.items():
                self.r_max[m] = max(self.r_max.get(m, 0), pair.rank)
        glob: dict[str, agg.LoraPair] = {}
        for state in states + shared:
            for m, pair in state.items():
                if m not in glob and pair.rank == self.r_max[m]:
                    glob[m] = agg.LoraPair(A=pair.A.clone(), B=torch.zeros_like(pair.B),
                                           alpha=pair.alpha)
        self.global_model = glob
        outputs = {cid: {m: agg.truncate(glob[m], pair.rank, pair.alpha, m)
                         for m, pair in state.items()}
                   for cid, state in enumerate(states)}
        links = []
        for cid, out in outputs.items():
            flat = agg.to_peft_state_dict(out)
            own = {k: flat[k] for k in self.client_layout(cid)}
            self.clients[cid].load_adapter_state(own)
            if not self.shared_server:
                self.server.load_adapter_state(
                    {k: v for k, v in flat.items() if k not in own}, cid)
            links.append([cid, _layout_bytes(self.client_layout(cid)), nbytes(own)])
        if shared:
            self._load_shared({m: agg.truncate(glob[m], pair.rank, pair.alpha, m)
                               for part in shared for m, pair in part.items()})
        return Traffic(links, 0, 0)

    def _load_shared(self, new: Mapping[str, agg.LoraPair]) -> None:
        """Give a shared server side its aggregated adapters on the blocks ``new`` covers,
        with fresh AdamW moments there (the one optimizer policy); the blocks it alone
        holds (:meth:`server_held`) go on as they are."""
        widest = self._widest_client
        state = {**self.server.adapter_state(widest), **agg.to_peft_state_dict(dict(new))}
        self.server.apply_update({}, {widest: self._shared_settings()}, self.version,
                                 self.server_held())
        self.server.load_adapter_state(state, widest)

    def settings(self, cid: int, side: str = "client") -> LoraSettings:
        """Participant ``cid``'s adapters on one side (client or server), seeded by run,
        restart, participant and side, so they come out the same in any process. A
        shared server side has one for everyone (:meth:`_shared_settings`)."""
        if side == "server" and self.shared_server:
            return self._shared_settings()
        seed = (self.seed * 1_000_003 + self.restarts * 1009 + 2 * cid
                + (side == "server")) % 2**63
        return self.plans[cid].settings(self.spec.targets, self.candidates, self.alpha,
                                        self.dropout, init_seed=seed)

    def _shared_settings(self) -> LoraSettings:
        """The shared server side's adapters: on each matrix of a block some client's
        server side reaches, the largest rank any such client's plan gives it there."""
        ranks: dict[str, int] = {}
        for plan in self.plans:
            for m, r in plan.ranks.items():
                if plan.cut <= self.spec.block_of(m) < self._stop:
                    ranks[m] = max(ranks.get(m, 0), r)
        seed = (self.seed * 1_000_003 + self.restarts * 1009 - 1) % 2**63
        return PartyPlan(self._shallowest(), ranks).settings(
            self.spec.targets, self.candidates, self.alpha, self.dropout, init_seed=seed)

    def _shallowest(self) -> int:
        return min(plan.cut for plan in self.plans)

    @property
    def _stop(self) -> int:
        """Where the server's blocks end: ``L``, or ``L - tail`` in a U-shaped split."""
        return self.n_blocks - self.tail

    def _shared_segments(self) -> dict[int, Any]:
        """Every client's server segment as a view of one segment from the shallowest
        cut (:func:`~hsplitlora.models.split.server_view`)."""
        _, full, _ = hetero_segments(self.base, self._shallowest(), self._shared_settings(),
                                     self.tail)
        return {cid: server_view(full, plan.cut) for cid, plan in enumerate(self.plans)}

    def _server_settings(self) -> dict[int, LoraSettings]:
        return {cid: self.settings(cid, "server") for cid in range(len(self.plans))}

    def _server_ranges(self, ids: Collection[int]
                       ) -> list[tuple[dict[str, agg.LoraPair], int]]:
        """A shared server side as aggregation participants: its adapters split into the
        block ranges between consecutive cuts, each weighted by the shards of the clients
        ``ids`` whose server side reaches it. With a client's own adapters weighted by its
        shard, every block's contributors then weigh the whole data exactly once. The
        blocks behind the deepest cut take no part (:meth:`server_held`)."""
        state = self._shared_state()
        cuts = sorted({plan.cut for plan in self.plans})
        out = []
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            part = {m: pair for m, pair in state.items() if lo <= self.spec.block_of(m) < hi}
            weight = sum(self.clients[c].num_samples for c in ids if self.plans[c].cut <= lo)
            if part and weight:
                out.append((part, weight))
        return out

    def _shared_state(self) -> dict[str, agg.LoraPair]:
        """The shared server side's adapters, every block of it."""
        return agg.from_peft_state_dict(self.server.adapter_state(self._widest_client),
                                        self.alpha)

    @property
    def _widest_client(self) -> int:
        """The client at the shallowest cut: its view of a shared server side is all of it."""
        return min(range(len(self.plans)), key=lambda c: self.plans[c].cut)

    def server_held(self) -> set[str]:
        """Candidate modules only a shared server side trains: those of the blocks behind
        every client's cut (and before a tail). Its one adapter there has learned from
        every batch that reached it, so there is nothing to aggregate: aggregations leave
        it as it is (not merged, not restarted, its AdamW moments kept), as SplitLoRA's
        server adapter trains on (docs/hsplitlora.md, "Shared server side"). A re-plan
        folds it into the base first (:meth:`replan`)."""
        if not self.shared_server:
            return set()
        deepest = max(plan.cut for plan in self.plans)
        return {m for m in self.candidates if deepest <= self.spec.block_of(m) < self._stop}

    def _held_state(self) -> dict[str, agg.LoraPair]:
        """The server-held adapters (:meth:`server_held`) that have learned something."""
        held = self.server_held()
        if not held:
            return {}
        return {m: pair for m, pair in self._shared_state().items()
                if m in held and bool(pair.B.any())}

    def _held_deltas(self) -> dict[str, torch.Tensor]:
        """``scale * B A`` (fp32, ``[d_out, d_in]``) of each server-held adapter that has
        learned something: the part of the global model not merged into the base."""
        return {m: agg.delta(pair).float() for m, pair in self._held_state().items()}

    def unmerged(self) -> Unmerged | None:
        """What an evaluation of the global model adds to the base (None: nothing, the
        merged base is the global model): the server-held adapters of a merging method,
        the whole global model of the others, whose base stays as it was."""
        deltas = self._held_deltas() if self.aggregator in MERGING else self.global_update()
        if not deltas:
            return None
        return Unmerged({m: d.T if self.spec.fan_in_fan_out else d for m, d in deltas.items()})

    def _fold_held(self) -> None:
        """Merge what the server-held adapters learned into the base, as one more merge
        (replayed on resume like the others), so that a re-plan may restart them, hand
        their blocks to a client or change their ranks without losing it."""
        state = self._held_state()
        if not state:
            return
        updates = combine("noisefree", [state], [1.0])
        assert isinstance(updates, dict)
        self.merges.append(updates)
        merge_base_update(self.base, updates, self.version,
                          fan_in_fan_out=self.spec.fan_in_fan_out)
        self.server.apply_update(updates, self._server_settings(), self.version)

    def participant_states(self, ids: Collection[int] | None = None
                           ) -> list[dict[str, agg.LoraPair]]:
        """Each client's adapters joined with its server-side copy's: one full adapter
        (of the clients in ``ids``, default all)."""
        return [self._joined(c.client_id, c.adapter_state())
                for c in self.clients if ids is None or c.client_id in ids]

    def _joined(self, cid: int, client_state: Mapping[str, torch.Tensor]
                ) -> dict[str, agg.LoraPair]:
        """A participant's whole adapter: its client's, and its server-side copy's (a
        shared server side takes part on its own: :meth:`_server_ranges`)."""
        server = {} if self.shared_server else self.server.adapter_state(cid)
        return agg.from_peft_state_dict({**client_state, **server}, self.alpha)

    def replan(self, plans: Sequence[PartyPlan]) -> None:
        """Adopt new plans; only valid right after a merging aggregation."""
        self._fold_held()
        old = self.plans
        self.plans = list(plans)
        self.restarts += 1
        for cid, plan in enumerate(plans):
            if plan.cut != old[cid].cut:  # a tail keeps its blocks: only the head moves
                client_seg, server_seg, _ = hetero_segments(self.base, plan.cut,
                                                            self.settings(cid), self.tail)
                self.clients[cid].replace_segment(client_seg)
                if not self.shared_server:
                    self.server.replace_segment(cid, server_seg)
        if self.shared_server and [p.cut for p in plans] != [p.cut for p in old]:
            self.server.replace_segments(self._shared_segments())
        for cid, client in enumerate(self.clients):
            client.reset_adapters(self.settings(cid))
        self.server.apply_update({}, self._server_settings(), self.version)

    @property
    def version(self) -> int:
        """The number of updates merged into the base so far."""
        return len(self.merges)

    def aggregate(self, ids: Collection[int] | None = None, round: int = 0) -> Traffic:
        """Aggregate the adapters of the participants in ``ids`` (default all: those that
        trained since the last aggregation) after ``round``; returns what moved where.

        Merging methods merge the result into every copy, present or not (base weights
        stay identical everywhere). The others load each aggregated participant's output
        back; a participant that did not train keeps its adapters until it next does. A
        remote client that is gone by now (:class:`PartyLost`) is left out. With a fed
        server in another process (``fed``) the clients' adapters go there, not here.
        """
        members = [c for c in self.clients if ids is None or c.client_id in ids]
        # what each client uploads: its adapters as they are now (HetLoRA's self-pruning,
        # in the combine, changes the layouts only afterwards)
        sent = {c.client_id: _layout_bytes(self.client_layout(c.client_id)) for c in members}
        if self.fed is None:
            included, result, up = self._combine_here(members)
        else:
            included, result, up = self.fed.combine(round, {c.client_id: Contribution(
                c, c.num_samples, self.plans[c.client_id].cut, self.settings(c.client_id),
                self.client_layout(c.client_id), self.server.adapter_state(c.client_id))
                for c in members})
        if not included:
            return Traffic([], 0, 0)
        uploads = {cid: sent[cid] for cid in included}
        if self.aggregator in MERGING:
            updates = result
            self.merges.append(updates)
            merge_base_update(self.base, updates, self.version,
                              fan_in_fan_out=self.spec.fan_in_fan_out)
            self.restarts += 1
            for cid, client in enumerate(self.clients):
                client.apply_update(updates, self.settings(cid), self.version)
            self.server.apply_update(updates, self._server_settings(), self.version,
                                     self.server_held())
            # Each client downloads the update of the blocks it holds (present or not: it
            # is brought up to date when it rejoins); the main server gets everything once
            # and applies it to all of its copies.
            links = [[c.client_id, uploads.get(c.client_id, 0),
                      _update_bytes(updates, self._client_modules(c.client_id))]
                     for c in self.clients]
            return Traffic(links, up - sum(uploads.values()), _update_bytes(updates, set(updates)))
        outputs, glob, shared = result
        self.global_model = self._padded(glob)
        links, server_down = [], 0
        restart, server_side = {}, {}
        for client in members:
            cid = client.client_id
            if cid not in included:
                continue
            flat = agg.to_peft_state_dict(outputs[cid])
            own = {k: flat[k] for k in self.client_layout(cid)}
            # the one optimizer policy: fresh AdamW moments after every aggregation
            client.reset_adapters(self.settings(cid))
            client.load_adapter_state(own)
            links.append([cid, uploads[cid], nbytes(own)])
            if not self.shared_server:
                restart[cid] = self.settings(cid, "server")
                server_side[cid] = {k: v for k, v in flat.items() if k not in own}
                server_down += nbytes(flat) - nbytes(own)
        if shared:  # the shared side's block ranges, one participant each
            self._load_shared(shared)
            server_down += nbytes(agg.to_peft_state_dict(shared))
        if restart:
            self.server.apply_update({}, restart, self.version)  # fresh AdamW, as the clients
        for cid, state in server_side.items():
            self.server.load_adapter_state(state, cid)
        return Traffic(links, up - sum(uploads.values()), server_down)

    def _padded(self, glob: Mapping[str, agg.LoraPair]) -> dict[str, agg.LoraPair]:
        """HetLoRA's global adapter at its fixed rank ``r_max`` per matrix (zero ranks past
        what this aggregation's participants held); the other methods' as they come."""
        out = {}
        for m, pair in glob.items():
            pad = self.r_max.get(m, pair.rank) - pair.rank
            out[m] = pair if pad <= 0 else agg.LoraPair(
                A=torch.nn.functional.pad(pair.A, (0, 0, 0, pad)),
                B=torch.nn.functional.pad(pair.B, (0, pad)), alpha=pair.scale * (pair.rank + pad))
        return out

    def _adopt_ranks(self, cid: int, state: Mapping[str, agg.LoraPair]) -> None:
        """Participant ``cid``'s plan takes the ranks of its (self-pruned) adapter."""
        plan = self.plans[cid]
        ranks = {m: pair.rank for m, pair in state.items()}
        if any(plan.ranks.get(m) != r for m, r in ranks.items()):
            self.plans[cid] = PartyPlan(plan.cut, {**plan.ranks, **ranks})

    def _combine_here(self, members: Sequence[Any]) -> tuple[list[int], Any, int]:
        """Aggregation in this process: fetch the clients' adapters, join each with its
        server-side copy, combine."""
        uploads: dict[int, dict[str, torch.Tensor]] = {}
        for c in members:
            try:
                uploads[c.client_id] = c.adapter_state()
            except PartyLost as e:
                log.warning("aggregation goes on without client %d: %s", c.client_id, e)
        if not uploads:
            return [], None, 0
        states = [self._joined(cid, state) for cid, state in uploads.items()]
        if self.pruning is not None:  # each client prunes before it uploads (HetLoRA)
            states = prune_states(states, self.pruning)
            for cid, state in zip(uploads, states, strict=True):
                self._adopt_ranks(cid, state)
        weights = [c.num_samples for c in members if c.client_id in uploads]
        n = len(states)
        if self.shared_server:
            for part, weight in self._server_ranges(list(uploads)):
                states.append(part)
                weights.append(weight)
        up = sum(nbytes(agg.to_peft_state_dict(s)) for s in states)
        result = combine(self.aggregator, states, weights,
                         sparsity_weights=self.sparsity_weights)
        if isinstance(result, PerParticipant):  # the shared side's ranges come after
            outputs = list(result.outputs)
            result = PerParticipant(dict(zip(uploads, outputs[:n], strict=True)), result.glob,
                                    {m: p for part in outputs[n:] for m, p in part.items()})
        return list(uploads), result, up

    def client_layout(self, cid: int) -> dict[str, tuple[int, int]]:
        """Names and shapes of client ``cid``'s adapter tensors under its current plan."""
        own = self._client_blocks(cid)
        held = {m: s for m, s in self.shapes.items() if self.spec.block_of(m) in own}
        return adapter_shapes(held, self.settings(cid), self.spec.default_targets)

    def _client_blocks(self, cid: int) -> set[int]:
        """The blocks client ``cid`` runs itself: below its cut, and a U-shaped tail."""
        return set(client_blocks(self.plans[cid].cut, self.tail, self.n_blocks))

    def _client_modules(self, cid: int) -> set[str]:
        """Candidate modules in the blocks client ``cid`` runs itself."""
        own = self._client_blocks(cid)
        return {m for m in self.candidates if self.spec.block_of(m) in own}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to go on exactly as this one would: plans,
        restarts, the merges, every server-side copy and every client. A remote client
        that is gone is left out (it is rebuilt from the plan when it comes back)."""
        clients = {}
        for c in self.clients:
            try:
                clients[c.client_id] = c.state_dict()
            except PartyLost as e:
                log.warning("the checkpoint goes on without client %d: %s", c.client_id, e)
        return {"plans": list(self.plans), "restarts": self.restarts,
                "merges": list(self.merges),
                "global": dict(self.global_model), "r_max": dict(self.r_max),
                "server": self.server.state_dict(), "clients": clients}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`, in a system freshly built over the pristine
        base: replay the merges, rebuild every party for the saved plans, load states."""
        self.merges = list(state["merges"])
        for version, updates in enumerate(self.merges, 1):
            merge_base_update(self.base, updates, version,
                              fan_in_fan_out=self.spec.fan_in_fan_out)
        self.plans, self.restarts = list(state["plans"]), state["restarts"]
        self.global_model = dict(state.get("global", {}))
        self.r_max = dict(state.get("r_max", {}))
        for cid, plan in enumerate(self.plans):
            client_seg, server_seg, _ = hetero_segments(self.base, plan.cut, self.settings(cid),
                                                        self.tail)
            self.clients[cid].replace_segment(client_seg)
            self.clients[cid].reset_adapters(self.settings(cid))
            if not self.shared_server:
                self.server.replace_segment(cid, server_seg)
        if self.shared_server:
            self.server.replace_segments(self._shared_segments())
        self.server.apply_update({}, self._server_settings(), self.version)  # planned ranks
        self.server.load_state_dict(state["server"])
        for c in self.clients:
            saved = state["clients"].get(c.client_id)
            if saved is None:
                log.warning("client %d was gone when the checkpoint was taken: it restarts "
                            "from its plan", c.client_id)
                continue
            try:
                c.load_state_dict(saved)
            except PartyLost as e:
                log.warning("client %d could not be restored: %s", c.client_id, e)

    def restore_base(self) -> None:
        """Put the original base weights back into ``base`` (undo the merges), so the run's
        result can be expressed as base + adapter, as PEFT users will load it."""
        restore_original(base_weights(self.base, self.candidates))

    def global_update(self) -> dict[str, torch.Tensor]:
        """The global model's total update to each adapted base weight (dense, fp32).

        Merging methods: what has been merged into the base so far (after the final
        aggregation the other adapters are fresh, B = 0, and add nothing) plus the
        server-held adapters (:meth:`server_held`). Other methods: the latest
        aggregation's global model, ``scale * B A`` of each matrix: FlexLoRA's exact
        weighted update, HetLoRA's rank-``r_max`` global adapter (and a shared server
        side's held adapters, in no aggregation).
        """
        if self.aggregator in MERGING:
            out = {}
            for module, weight in base_weights(self.base, self.candidates).items():
                delta = merged_delta(weight)
                if delta is not None and delta.abs().max() > 0:
                    out[module] = delta.T if self.spec.fan_in_fan_out else delta.clone()
            for module, delta in self._held_deltas().items():
                out[module] = out[module] + delta if module in out else delta
            return out
        out = {m: agg.delta(pair).float() for m, pair in self.global_model.items()}
        return {**out, **self._held_deltas()}  # the held blocks are in no global model


class Unmerged(NamedTuple):
    """Updates that belong to the global model but are not merged into the base (fp32,
    each weight's own layout): what an evaluation adds for its duration
    (:func:`hsplitlora.models.shared.added`)."""

    deltas: dict[str, torch.Tensor]


class PerParticipant(NamedTuple):
    """A non-merging aggregation's result: each participant's new adapter and the
    method's global model per matrix."""

    outputs: Any  # list (in the states' order) or dict by participant id
    glob: dict[str, agg.LoraPair]
    shared: dict[str, agg.LoraPair] = {}  # a shared server side's new adapters, if any


def prune_states(states: Sequence[Mapping[str, agg.LoraPair]], pruning: SelfPruning
                 ) -> list[dict[str, agg.LoraPair]]:
    """HetLoRA's rank self-pruning of every participant's matrices."""
    return [{m: agg.prune_tail(pair, pruning.gamma, pruning.threshold)
             for m, pair in state.items()} for state in states]


def combine(aggregator: str, states: Sequence[Mapping[str, agg.LoraPair]],
            weights: Sequence[float], *, sparsity_weights: bool = True
            ) -> dict[str, Update] | PerParticipant:
    """One aggregation over full participant adapters (client side joined with its
    server-side copy): the update to merge (``noisefree``, ``stack``) or each
    participant's new adapter with the global model (``svd``, ``zeropad``, ``fedavg``)."""
    if aggregator == "noisefree":
        return {m: _as_update(agg.dense_or_factors(f))
                for m, f in agg.noisefree(states, weights).items()}
    if aggregator == "stack":  # FLoRA ships the stacked adapter itself (rank sum r_k, scale 1)
        return {m: (pair.B, pair.A) for m, pair in agg.stack(states, weights).items()}
    if aggregator == "svd":  # the global model: the exact weighted update, stacked
        return PerParticipant(agg.svd(states, weights)[0], agg.stack(states, weights))
    if aggregator == "zeropad":  # the global adapter, and each participant's truncation
        return PerParticipant(
            agg.zeropad(states, weights, norm_weighted=sparsity_weights),
            agg.zeropad_global(states, weights, norm_weighted=sparsity_weights))
    merged = agg.fedavg(states, weights)
    return PerParticipant([merged for _ in states], merged)


@dataclass(frozen=True)
class Contribution:
    """What one participant brings to an aggregation on a fed server in another
    process, besides its client's adapter (which the client sends there itself)."""

    client: Any  # the client (proxy), told to upload its adapter
    num_samples: int
    cut: int
    settings: LoraSettings
    layout: dict[str, tuple[int, int]]  # its client's adapter: names and shapes
    server_state: dict[str, torch.Tensor]  # its server-side copy's adapter


class FedAggregation(Protocol):
    """A fed server in another process, so the main server never holds a client's
    adapter: it returns the participants it aggregated, the result (the update to merge,
    or each participant's new adapter by id) and the bytes uploaded to it."""

    def combine(self, round: int, parties: Mapping[int, Contribution]
                ) -> tuple[list[int], Any, int]: ...


def _as_update(x: agg.Factors | torch.Tensor) -> Update:
    return x if isinstance(x, torch.Tensor) else (x.U, x.V)


@dataclass(frozen=True)
class Traffic:
    """What an aggregation moved: per client ``[id, bytes up, bytes down]`` over that
    client's own link (its adapters up, what it gets back down), and the server-side
    adapters' bytes between the main server and the fed server (in one process, or over
    their own link), which never touch a client's."""

    links: list[list[int]]
    server_up: int
    server_down: int


def _layout_bytes(layout: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes of an fp32 adapter state with these tensor shapes (what a client uploads)."""
    return 4 * sum(math.prod(shape) for shape in layout.values())


def _update_bytes(updates: Mapping[str, Update], held: set[str]) -> int:
    total = 0
    for m, u in updates.items():
        if m in held:
            total += nbytes(u) if isinstance(u, torch.Tensor) else nbytes(list(u))
    return total


def run_hetero(system: HeteroSystem, steps: int, interval: int, rec: Recorder,
               replan: Callable[[int], Sequence[PartyPlan] | None] | None = None,
               attendance: Attendance = everyone, *, start: int = 0,
               trained: Collection[int] = (),
               checkpoint: Callable[[int, dict[str, Any]], None] | None = None) -> None:
    """Train all participants for ``steps`` local steps, aggregating every ``interval``:
    the :class:`~hsplitlora.train.engine.Parallel` schedule with the heterogeneous step
    and aggregation.

    ``replan(round)`` is asked after each merging aggregation; a non-None answer becomes
    the new plans (it logs its own reasons). ``attendance(round)`` gives the clients
    present in a round (None: all); an aggregation covers those that trained since the
    previous one. ``checkpoint(round, loop)`` is called as each round ends; a resumed
    run starts at round ``start`` with the clients that had ``trained`` since the last
    aggregation.
    """

    def aggregate(among: list[Any], t: int, last: bool) -> None:
        ids = {c.client_id for c in among}
        before = list(system.plans)
        moved = system.aggregate(ids, t)
        rec.event("aggregate", round=t, side="all", method=system.aggregator,
                  clients=sorted(ids), links=moved.links,
                  bytes_up=sum(up for _, up, _ in moved.links),
                  bytes_down=sum(down for _, _, down in moved.links),
                  server_bytes_up=moved.server_up, server_bytes_down=moved.server_down)
        if system.plans != before:  # HetLoRA's self-pruning lowered some ranks
            rec.event("replan", round=t, reason="self-pruning",
                      plans=[{"cut": p.cut, "ranks": dict(p.ranks)} for p in system.plans])
        rec.global_model(t, system.unmerged)  # the base, and what is not merged into it
        if system.aggregator not in MERGING:
            return None
        if replan is not None and not last:
            plans = replan(t)
            if plans is not None:
                system.replan(plans)
                rec.event("replan", round=t,
                          plans=[{"cut": p.cut, "ranks": dict(p.ranks)} for p in plans])
        return None

    moved = system.start_traffic
    if moved is not None and start == 0:
        rec.event("start", round=0, method=system.aggregator,
                  clients=[cid for cid, _, _ in moved.links], links=moved.links,
                  bytes_up=sum(up for _, up, _ in moved.links),
                  bytes_down=sum(down for _, _, down in moved.links))
    schedule = Parallel(
        system.clients,
        lambda c, t: client_step(c, system.server, rec, t, local=system.federated),
        aggregate, lambda merged: {}, interval, rec, attendance,
        {"trained": sorted(trained)})
    run_rounds(schedule, steps, rec, start=start, checkpoint=checkpoint)
