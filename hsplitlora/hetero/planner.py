"""From a run configuration to per-client plans: HSplitLoRA, its ablations, the baselines.

* ``hsplitlora``: important weight identification (IWI, ``hetero.importance``) scores every
  candidate matrix by split probing; adaptive rank and split-point configuration (ARMSC,
  ``hetero.adaptive``) plans each client's cut and ranks under its budget; aggregation is
  ``hetero.aggregator`` (noise-free by default). Switching a part off:
  IWI off = every candidate equally important; ARMSC off = every client at ``train.cut``
  with rank ``lora.r`` on as many matrices as the default targets cover, chosen by
  importance when IWI is on (the default targets when off); aggregator = any of
  ``stack``, ``svd``, ``zeropad``.
* ``hetlora``, ``flexlora``, ``flora``: every client at ``train.cut``; each gets the largest
  rank of Q whose adapters on the default targets (client and server side) fit its memory;
  aggregation by zero-padding, SVD, or stacking respectively.
* ``splitlora`` on heterogeneous devices: every client forced to the weakest client's rank
  (the largest rank that *every* client fits), as a homogeneous system must.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hsplitlora.hetero.armsc import (
    ClientPlan,
    Plan,
    PlanError,
    PlannerSettings,
    merged_downloads,
    plan_clients,
    server_load,
    should_replan,
    synchronous_round,
    with_aggregations,
)
from hsplitlora.hetero.costmodel import (
    ModelDims,
    Workload,
    client_memory,
    server_flops,
    step_time,
)
from hsplitlora.hetero.importance import (
    ImportanceTracker,
    ServerScorer,
    module_energy,
    rank_gains,
    ranking,
)
from hsplitlora.hetero.profiles import DeviceProfile, format_bytes
from hsplitlora.models.lora import target_module_names
from hsplitlora.models.split import arch_spec
from hsplitlora.models.structure import client_blocks
from hsplitlora.modes import MERGING
from hsplitlora.roles.messages import Activations, ServerReply, nbytes
from hsplitlora.train.hetero import HeteroSystem, PartyPlan
from hsplitlora.train.placement import PartyLost
from hsplitlora.train.recorder import Recorder

__all__ = ["Planner", "aggregator_for", "probe_importance", "uniform_rank"]

log = logging.getLogger(__name__)

def aggregator_for(cfg: Any) -> str:
    """The run's aggregation method: the mode's own, or ``hetero.aggregator``."""
    return cfg.mode.aggregator or cfg.hetero.aggregator


def probe_importance(system: HeteroSystem, n_batches: int, precision: str,
                     label_smoothing: float = 0.0) -> tuple[dict[str, float], list[list[int]]]:
    """Every participant scores its own blocks on its own probe batches (the client its
    client side, on its own premises; its server-side copy the rest, from the activations
    it receives, with the run's loss and label smoothing); the gradient energies
    (:func:`~hsplitlora.hetero.importance.segment_importance`) are averaged over
    participants, weighted by shard size.

    They are not divided by adapter cost: the planner buys rank by gain per byte.
    Where no planner runs (ARMSC off), :meth:`Planner._fixed_cut_plans` divides by cost.

    A remote client that is gone (:class:`~hsplitlora.train.placement.PartyLost`) is left
    out; the weights renormalise over the clients that scored.

    Also returns what probing moved, per client that scored: ``[id, bytes up, bytes down,
    batches, cut]`` (its activations and their gradients, at the cut it probed at), for
    the run's record and clock.
    """
    per_client: list[tuple[dict[str, float], int]] = []
    links: list[list[int]] = []
    for client in system.clients:
        # Under the Ray backend this is a copy fetched from the actor: scoring only reads
        # it (its hooks come off again), so it may run here.
        server_seg = system.server.segments[client.client_id]
        with ServerScorer(server_seg, precision=precision, label_smoothing=label_smoothing,
                          spectrum=True) as scorer:
            metered = _Metered(scorer)
            try:
                scores = client.score(n_batches, metered)
            except PartyLost as e:
                log.warning("importance probing goes on without client %d: %s",
                            client.client_id, e)
                continue
            server = scorer.energies()
        per_client.append(({**scores, **server}, client.num_samples))
        links.append([client.client_id, metered.up, metered.down, metered.batches,
                      system.plans[client.client_id].cut])
    if not per_client:
        raise PartyLost("no client took part in importance probing")
    norm = sum(w for _, w in per_client)
    total: dict[str, float] = {}
    for scores, w in per_client:
        for name, value in scores.items():
            total[name] = total.get(name, 0.0) + value * w / norm
    return total, links


class _Metered:
    """The server's scorer for one client, counting what probing moves over that
    client's link: per batch its activations up and their gradient down, and in a
    U-shaped split also the activations at its tail down and their gradient up."""

    def __init__(self, scorer: ServerScorer) -> None:
        self.scorer = scorer
        self.up = self.down = self.batches = 0

    def reply(self, acts: Activations) -> ServerReply:
        out = self.scorer.reply(acts)
        self.up, self.down, self.batches = (self.up + acts.nbytes, self.down + out.nbytes,
                                            self.batches + 1)
        return out

    def forward(self, acts: Activations) -> torch.Tensor:
        out = self.scorer.forward(acts)
        self.up, self.down, self.batches = (self.up + acts.nbytes, self.down + nbytes(out),
                                            self.batches + 1)
        return out

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        out = self.scorer.backward(grad)
        self.up, self.down = self.up + nbytes(grad), self.down + nbytes(out)
        return out


def uniform_rank(dims: ModelDims, profile: DeviceProfile, cut: int, modules: Sequence[str],
                 rank_set: Sequence[int], work: Workload, tail: int = 0) -> int:
    """Largest rank of Q whose adapters on ``modules`` (client side: its cut's blocks and a
    U-shaped client's ``tail``) fit ``profile``."""
    own = set(client_blocks(cut, tail, dims.n_layers))
    prefix_blocks = {m for m in modules if _block(m) in own}
    best = 0
    for r in sorted(x for x in rank_set if x > 0):
        mem = client_memory(dims, cut, {m: r for m in prefix_blocks}, work, tail).total
        if mem <= profile.memory_bytes:
            best = r
    if best == 0:
        need = client_memory(dims, cut, {m: min(x for x in rank_set if x > 0)
                                         for m in prefix_blocks}, work, tail).total
        held = f"cut {cut} and a tail of {tail}" if tail else f"cut {cut}"
        raise PlanError(f"client '{profile.name}' cannot hold {held} with the smallest rank: "
                        f"it needs {format_bytes(need)} but its budget is "
                        f"{format_bytes(profile.memory_bytes)} (short by "
                        f"{format_bytes(need - profile.memory_bytes)}); lower train.cut"
                        f"{' or train.tail' if tail else ''}, "
                        "batch size or max_length, or give it more memory")
    return best


def _block(module: str) -> int:
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"{module} names no block")


class Planner:
    """Holds the run's devices, cost model and importance history; makes the plans."""

    def __init__(self, cfg: Any, model: nn.Module, profiles: Sequence[DeviceProfile],
                 server: DeviceProfile, seq: int) -> None:
        self.cfg = cfg
        self.hc = cfg.hetero
        self.mode = cfg.mode
        self.dims = ModelDims.from_config(model.config)
        self.spec = arch_spec(model.config)
        self.profiles, self.server = list(profiles), server
        # Budgets cost the frozen weights in the dtype they are stored in, not the compute
        # precision, and a merging aggregator's pre-merge copies and fp32 merged updates.
        stored = next(model.parameters()).element_size()
        quant = cfg.model.quantization
        self.work = Workload.for_precision(
            cfg.train.precision, batch=cfg.train.batch_size, seq=seq,
            lora_dropout=cfg.lora.dropout, weight_bytes=stored,
            merge_bytes=stored + 4 if aggregator_for(cfg) in MERGING else 0,
            quantization=quant, server_quantization=quant if cfg.model.quantize_server else "none")
        self.default_modules = target_module_names(
            model, tuple(cfg.lora.targets) if cfg.lora.targets else None)
        self.candidates = target_module_names(model, self.spec.targets)
        self.tracker = ImportanceTracker(beta=self.hc.ema_beta)
        self.planned_on: dict[str, float] | None = None
        n, self.tail = self.dims.n_layers, cfg.train.tail
        # a U-shaped client's tail leaves the server blocks [cut, L - tail): one at least
        cuts = self.hc.cuts or list(range(1, n - self.tail if self.tail else n))
        self.settings = PlannerSettings(
            ranks=tuple(sorted(set([0, *self.hc.rank_set]))), min_cut=min(cuts),
            max_cut=max(cuts), server_rank=self.hc.server_rank,
            time_budget_s=self.hc.time_budget_s, interval=cfg.train.agg_interval,
            round_time_s=self.hc.round_time_s, shared_server=cfg.server_side == "shared",
            tail=self.tail, merged_download=aggregator_for(cfg) in MERGING)

    def state_dict(self) -> dict[str, Any]:
        """The importance history and the scores the current plans were made on."""
        return {"tracker": self.tracker.state_dict(), "planned_on": self.planned_on}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.planned_on = state["planned_on"]

    @property
    def uses_importance(self) -> bool:
        return self.mode.importance and self.hc.importance

    @property
    def aggregator(self) -> str:
        return aggregator_for(self.cfg)

    def provisional(self) -> list[PartyPlan]:
        """The plan importance is first measured under: the shallowest allowed cut, no
        adapters (nothing trained yet, so the base weights are all there is to score)."""
        return [PartyPlan(self.settings.min_cut) for _ in self.profiles]

    def observe(self, scores: dict[str, float]) -> dict[str, float]:
        smoothed = self.tracker.update(scores)
        energy = module_energy(smoothed)
        log.info("gradient energy (smoothed), top 5: %s", ", ".join(
            f"{m.split('.', 2)[-1]}={energy[m]:.3g}" for m in ranking(energy)[:5]))
        return smoothed

    def plans(self, importance_scores: dict[str, float] | None) -> list[PartyPlan]:
        """Per-client plans (cut and ranks of client and server side) for this run's mode."""
        return [PartyPlan(c.cut, {**c.ranks, **c.server_ranks})
                for c in self.client_plans(importance_scores).clients]

    def client_plans(self, importance_scores: dict[str, float] | None) -> Plan:
        """The plans with the cost model's figures (memory, step time, utility)."""
        if not self.mode.planned:  # homogeneous modes
            rank = (self.cfg.lora.r if self.hc.scenario.kind == "homogeneous"
                    else self.weakest_rank())
            return self.describe([PartyPlan(self.cfg.train.cut,
                                            dict.fromkeys(self.default_modules, rank))
                                  for _ in self.profiles])
        if self.uses_importance:
            self.planned_on = importance_scores
        if not (self.mode.adaptive and self.hc.adaptive):
            return self.describe(self._fixed_cut_plans(importance_scores))
        gains = (rank_gains(importance_scores, self.settings.gain_ranks)
                 if self.uses_importance and importance_scores else None)
        plan = plan_clients(self.profiles, self.server, self.dims, gains, self.work,
                            self.settings)
        for c in plan.clients:
            log.info("client %d (%s): cut %d, %d client-side adapters, memory %s / %s, "
                     "est. %.3g s/step", c.client_id, c.profile.name, c.cut, len(c.ranks),
                     format_bytes(c.memory.total), format_bytes(c.budget_bytes),
                     c.step_seconds)
        return plan

    def _fixed_cut_plans(self, scores: dict[str, float] | None) -> list[PartyPlan]:
        # Federated baselines: the client holds every block (the unsplit model).
        cut = self.dims.n_layers if self.hc.federated else self.cfg.train.cut
        if self.mode.adaptive:  # ARMSC off: lora.r everywhere, placed by IWI if on
            modules = self.default_modules
            if scores is not None and self.uses_importance:
                energy = module_energy(scores)
                per_cost = {}  # the same rank everywhere: the best matrices per unit cost
                for m in self.candidates:
                    matrix = self.dims.locate(m)[1]
                    per_cost[m] = energy.get(m, 0.0) / (matrix.d_in + matrix.d_out)
                modules = ranking(per_cost)[: len(self.default_modules)]
            return [PartyPlan(cut, {m: self.cfg.lora.r for m in modules}) for _ in self.profiles]
        ranks = [uniform_rank(self.dims, p, cut, self.default_modules, self.hc.rank_set,
                              self.work, self.tail) for p in self.profiles]
        for cid, r in enumerate(ranks):
            log.info("client %d (%s): cut %d, rank %d", cid, self.profiles[cid].name, cut, r)
        return [PartyPlan(cut, {m: r for m in self.default_modules}) for r in ranks]

    def probe(self, system: HeteroSystem, rec: Recorder, round: int) -> dict[str, float]:
        """Measure importance on every participant, record what it moved (a ``probe``
        event, which the clock times), and return the smoothed energies."""
        scores, links = probe_importance(system, self.hc.probe_batches,
                                         self.cfg.train.precision,
                                         self.cfg.train.label_smoothing)
        rec.event("probe", round=round, clients=[cid for cid, *_ in links], links=links,
                  bytes_up=sum(link[1] for link in links),
                  bytes_down=sum(link[2] for link in links))
        return self.observe(scores)

    def replan(self, system: HeteroSystem, rec: Recorder, round: int) -> list[PartyPlan] | None:
        """At an aggregation boundary: re-measure importance; re-plan if its ranking moved
        by more than ``hetero.replan_threshold``."""
        if not self.uses_importance:
            return None
        smoothed = self.probe(system, rec, round)
        if self.planned_on is not None and not should_replan(
                module_energy(self.planned_on), module_energy(smoothed),
                self.hc.replan_threshold):
            return None
        log.info("round %d: importance ranking moved past %.2f: re-planning", round + 1,
                 self.hc.replan_threshold)
        return self.plans(smoothed)

    def describe(self, plans: Sequence[PartyPlan]) -> Plan:
        """The cost model's view of some plans (memory, step time, round time with what
        each aggregation moves over the client's link, the main server's load), for the
        plan table and the run's summary."""
        out, tail = [], self.tail
        for cid, (plan, profile) in enumerate(zip(plans, self.profiles, strict=True)):
            own = set(client_blocks(plan.cut, tail, self.dims.n_layers))
            client = {m: r for m, r in plan.ranks.items() if _block(m) in own}
            server = {m: r for m, r in plan.ranks.items() if _block(m) not in own}
            memory = client_memory(self.dims, plan.cut, client, self.work, tail)
            seconds = step_time(profile, self.server, self.dims, plan.cut, client, server,
                                self.work, tail).total
            served = server_flops(self.dims, plan.cut, server, self.work, tail).total
            out.append(ClientPlan(cid, profile, plan.cut, client, server, memory,
                                  profile.memory_bytes, seconds, float("nan"),
                                  server_seconds=served / self.server.flops))
        merged = (merged_downloads(out, self.dims, self.settings.shared_server)
                  if self.settings.merged_download else None)
        out = with_aggregations(out, self.server, self.dims, self.work,
                                self.settings.interval, tail, merged)
        return Plan(out, round_seconds=synchronous_round(out, self.settings.interval),
                    server=server_load(out, self.server, self.dims, self.work,
                                            self.settings.interval,
                                            shared=self.settings.shared_server, tail=tail))

    def weakest_rank(self) -> int:
        """SplitLoRA on heterogeneous devices: the largest rank every client fits."""
        return min(uniform_rank(self.dims, p, self.cfg.train.cut, self.default_modules,
                                self.hc.rank_set, self.work, self.tail)
                   for p in self.profiles)
