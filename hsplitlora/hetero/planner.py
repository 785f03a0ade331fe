"""Per-client split point and LoRA ranks under the client's memory and step-time budgets.

HSplitLoRA's adaptive rank and split-point configuration, reconstructed: the paper's exact
optimisation is not public (see the papers notes, section 2.4).

**Objective.** For client i with cut k, every candidate matrix W of blocks ``[0, k)`` gets
a rank r_W from the candidate set Q (default ``{0, 2, 4, 8, 16}``, 0 = no adapter), and the
server adapts every candidate of blocks ``[k, L)`` at ``server_rank`` for this client. The
plan maximises the importance the client's training path covers, over the whole model::

    U = sum_{W in blocks < k} w(W) g(r_W)  +  sum_{W in blocks >= k} w(W) g(server_rank)
    g(r) = log2(1 + r) / log2(1 + max Q)

where w are the importance scores (:mod:`hsplitlora.hetero.importance`: full module name
-> score, higher = more important), clipped at 0 and normalised to sum to 1 over every
candidate of the model, so U = 1 means every matrix adapted at the top rank. g is
concave: doubling a rank buys less than the previous doubling, so memory spreads over
important matrices before it piles on one. Without importance scores (or when all are 0)
every candidate weighs the same. :mod:`~hsplitlora.hetero.importance` already divides its
scores by an adapter's cost by default; since the greedy below ranks by gain per byte,
large matrices then pay twice. Scores computed with ``normalise=False`` make the plan a
plain value-per-byte trade.

Counting the server's side is what makes the cut a trade-off rather than "as deep as the
memory allows": a block moved to the client loses the server's adapters, so a client
takes a block only when it can adapt it better than ``server_rank`` (or when it must hold
it to reach the blocks it can), and a weak client stays at ``min_cut``. With
``server_rank >= max(Q)`` no client ever gains by going deeper than ``min_cut``.

**Constraints.** The cost model's memory estimate must fit ``profile.memory_bytes`` and
its sequential step time (client compute, upload, server compute, download) must fit
``time_budget_s`` (none by default).

**Algorithm.** For every cut k in ``[min_cut, max_cut]`` and every first adapted block
f in ``[0, k]`` (f = k: no adapters), the fixed cost is the frozen weights of k blocks
plus the activations of blocks ``[f, k)`` with the inputs of *every* candidate reserved
(an upper bound of what any plan over those blocks keeps, see
:func:`~hsplitlora.hetero.costmodel.activation_bytes`). What is left is additive in the
ranks: each step of a matrix from one rank of Q to the next costs ``dr x`` its per-rank
bytes (adapter, gradient, AdamW moments, A output) and per-rank time, and gains
``w x (g(next) - g(current))``. Steps are taken greedily by gain per byte, knapsack
style; a step that does not fit closes its matrix (no later step of it is taken). Because
g is concave and the cost of a matrix is linear in its rank, a matrix's own steps come in
rank order in that sort. The best (k, f) wins. Without a time budget the result is within
one step's gain of the best plan for its (k, f) and reservation: the fractional optimum is
the greedy prefix plus part of the first step that does not fit. A binding time budget
only filters steps, so there the gap can be larger. Cost: O(L^2) (k, f) pairs, each a
pass over L x |candidates| x |Q| steps, about 0.1 s per client for a 30-block model.

This greedy has two guarantees the tests check: more memory never lowers U (the run for
the larger budget takes every step the smaller one took until the first step only it can
afford, which is worth more than all the smaller run takes afterwards, because those have
a lower gain per byte and fit in less than that step's cost); and, within the adapted
blocks, a matrix never gets a lower rank than a less important one of the same shape.

**Tie-breaking.** Options of equal U (to 1e-9) go to the shallower cut (less client memory
and compute; the server is the stronger machine), then to the smaller memory estimate.

**Reported figures.** ``ClientPlan.memory`` and ``step_seconds`` come from the cost model
for the chosen ranks, at most what the planner reserved, so they fit the budgets.

**Re-planning.** :func:`should_replan` compares two importance maps by the Kendall tau-b
rank correlation over the union of their names (a missing name scores 0); re-plan when
``1 - tau`` (0 = same order, 1 = unrelated, 2 = reversed) exceeds a threshold.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rich.table import Table

from hsplitlora.errors import UserError
from hsplitlora.hetero.costmodel import (
    MemoryBreakdown,
    ModelDims,
    Workload,
    activation_bytes,
    block_flops,
    bytes_down,
    bytes_up,
    client_memory,
    lora_flops_per_rank,
    lora_memory_per_rank,
    server_flops,
    step_time,
)
from hsplitlora.hetero.profiles import DeviceProfile, format_bytes

__all__ = [
    "DEFAULT_RANKS",
    "ClientPlan",
    "Plan",
    "PlanError",
    "PlannerSettings",
    "format_plan_table",
    "plan_client",
    "plan_clients",
    "rank_distance",
    "rank_gain",
    "should_replan",
]

logger = logging.getLogger(__name__)

DEFAULT_RANKS = (0, 2, 4, 8, 16)
_TIE = 1e-9


class PlanError(UserError, ValueError):
    """A client cannot run even the smallest configuration within its budgets."""


@dataclass(frozen=True)
class PlannerSettings:
    """Choices the planner works within."""

    ranks: tuple[int, ...] = DEFAULT_RANKS  # Q: candidate ranks, 0 = no adapter
    min_cut: int = 1  # the client always runs at least this many blocks
    max_cut: int | None = None  # None: all but the last block
    server_rank: int = 8  # rank of the server's adapters on blocks [cut, L); 0 = none
    time_budget_s: float | None = None  # per-step latency budget; None = unlimited

    def __post_init__(self) -> None:
        if sorted(set(self.ranks)) != list(self.ranks) or self.ranks[0] != 0 or len(self.ranks) < 2:
            raise ValueError(
                f"planner ranks must be increasing, start at 0 (no adapter) and hold at least "
                f"one positive rank, e.g. {DEFAULT_RANKS}; got {self.ranks}"
            )
        if self.server_rank < 0 or self.min_cut < 0:
            raise ValueError("server_rank and min_cut must be >= 0")
        if self.max_cut is not None and self.max_cut < self.min_cut:
            raise ValueError(f"max_cut {self.max_cut} is below min_cut {self.min_cut}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be positive, got {self.time_budget_s}")


@dataclass(frozen=True)
class ClientPlan:
    """One client's configuration and what the cost model expects of it."""

    client_id: int
    profile: DeviceProfile
    cut: int
    ranks: dict[str, int]  # client-side adapters: full module name -> rank > 0
    server_ranks: dict[str, int]  # the server's adapters for this client's blocks [cut, L)
    memory: MemoryBreakdown
    budget_bytes: int
    step_seconds: float
    utility: float  # U: importance covered by client and server adapters, weighted by g


@dataclass(frozen=True)
class Plan:
    clients: list[ClientPlan] = field(default_factory=list)

    @property
    def server_ranks(self) -> dict[str, int]:
        """Every adapter the server holds for some client (highest rank asked)."""
        out: dict[str, int] = {}
        for c in self.clients:
            for name, rank in c.server_ranks.items():
                out[name] = max(rank, out.get(name, 0))
        return out


def rank_gain(rank: int, max_rank: int) -> float:
    """g(r) = log2(1 + r) / log2(1 + r_max): 0 for no adapter, 1 at the top rank."""
    return math.log2(1 + rank) / math.log2(1 + max_rank)


def _weights(dims: ModelDims, importance: Mapping[str, float] | None) -> dict[str, float]:
    """Candidate name -> importance normalised over all candidates of the model."""
    names = list(dims.candidate_modules())
    if importance:
        bad = [n for n, v in importance.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"importance scores must be finite numbers; got {bad[:3]} for "
                             f"{len(bad)} module(s)")
        if not set(importance) & set(names):
            raise ValueError(
                f"none of the {len(importance)} importance scores names a candidate matrix; "
                f"expected full module names such as {names[0]!r}"
            )
    raw = {n: max(float(importance.get(n, 0.0)), 0.0) if importance else 1.0 for n in names}
    total = sum(raw.values())
    if total == 0:
        logger.warning("all importance scores are 0: weighting every candidate matrix equally")
        raw, total = dict.fromkeys(names, 1.0), float(len(names))
    return {n: v / total for n, v in raw.items()}


@dataclass(frozen=True)
class _Step:
    """Raising one matrix from ranks[j] to ranks[j + 1]."""

    name: str
    block: int
    j: int
    dr: int
    gain: float
    bytes: int
    seconds: float


def _steps(
    dims: ModelDims, weights: Mapping[str, float], profile: DeviceProfile, work: Workload,
    ranks: tuple[int, ...],
) -> list[_Step]:
    """Every rank step of every candidate, sorted by gain per byte (best first)."""
    top = ranks[-1]
    steps = []
    for block in range(dims.n_layers):
        for matrix in dims.candidates:
            name = dims.module_name(block, matrix)
            if weights[name] <= 0:
                continue
            per_byte = lora_memory_per_rank(matrix, work)
            per_second = lora_flops_per_rank(matrix, work).total / profile.flops
            for j, (lo, hi) in enumerate(zip(ranks, ranks[1:], strict=False)):
                gain = weights[name] * (rank_gain(hi, top) - rank_gain(lo, top))
                steps.append(_Step(name, block, j, hi - lo, gain, (hi - lo) * per_byte,
                                   (hi - lo) * per_second))
    steps.sort(key=lambda s: (-s.gain / s.bytes, -weights[s.name], s.block, s.name, s.j))
    return steps


def _greedy(
    steps: Sequence[_Step], blocks: range, memory_left: float, time_left: float,
    ranks: tuple[int, ...],
) -> tuple[dict[str, int], float]:
    """Take steps of matrices in ``blocks`` while they fit; return ranks and utility."""
    level: dict[str, int] = {}
    closed: set[str] = set()
    utility = 0.0
    for step in steps:
        if step.block not in blocks or step.name in closed:
            continue
        if step.bytes <= memory_left and step.seconds <= time_left:
            memory_left -= step.bytes
            time_left -= step.seconds
            utility += step.gain
            level[step.name] = step.j + 1
        else:
            closed.add(step.name)
    return {name: ranks[j] for name, j in level.items()}, utility


@dataclass(frozen=True)
class _Option:
    cut: int
    ranks: dict[str, int]
    utility: float
    reserved_bytes: int


def plan_client(
    client_id: int,
    profile: DeviceProfile,
    server: DeviceProfile,
    dims: ModelDims,
    importance: Mapping[str, float] | None,
    work: Workload,
    settings: PlannerSettings | None = None,
) -> ClientPlan:
    """The best cut and ranks for one client (see the module docstring)."""
    s = settings or PlannerSettings()
    max_cut = dims.n_layers - 1 if s.max_cut is None else s.max_cut
    if not 0 <= s.min_cut <= max_cut <= dims.n_layers:
        raise ValueError(f"planner cut range [{s.min_cut}, {max_cut}] does not fit a model of "
                         f"{dims.n_layers} blocks: it must lie within [0, {dims.n_layers}]")
    weights = _weights(dims, importance)
    steps = _steps(dims, weights, profile, work, s.ranks)
    budget = profile.memory_bytes
    time_budget = math.inf if s.time_budget_s is None else s.time_budget_s
    block = block_flops(dims, work)
    transfer = (bytes_up(work.batch, work.seq, dims.hidden, work.act_bytes)
                / min(profile.uplink_bps, server.downlink_bps)
                + bytes_down(work.batch, work.seq, dims.hidden, work.act_bytes)
                / min(server.uplink_bps, profile.downlink_bps))

    on_server = rank_gain(s.server_rank, s.ranks[-1])
    options: list[_Option] = []
    fastest = math.inf
    for cut in range(s.min_cut, max_cut + 1):
        served_utility = on_server * sum(
            weights[n] for n in dims.candidate_modules(range(cut, dims.n_layers)))
        frozen = client_memory(dims, cut, {}, work).frozen_weights
        served = server_flops(dims, cut, _server_ranks(dims, cut, s.server_rank), work).total
        fixed_time = transfer + served / server.flops + cut * block.forward / profile.flops
        if frozen <= budget:
            fastest = min(fastest, fixed_time)
        for first in range(cut, -1, -1):  # first == cut: no adapters
            reserved = frozen + activation_bytes(dims, range(first, cut), {}, work,
                                                 input_grad=False, reserve_inputs=True)
            seconds = fixed_time + (cut - first) * block.backward / profile.flops
            if reserved > budget or seconds > time_budget:
                break  # an earlier first block only adds to both
            ranks, utility = _greedy(steps, range(first, cut), budget - reserved,
                                     time_budget - seconds, s.ranks)
            options.append(_Option(cut, ranks, served_utility + utility, reserved))
    if not options:
        _raise_unfit(client_id, profile, dims, work, s, fastest, time_budget)
    top = max(o.utility for o in options)
    best = min((o for o in options if o.utility >= top - _TIE),
               key=lambda o: (o.cut, o.reserved_bytes))
    server_ranks = _server_ranks(dims, best.cut, s.server_rank)
    return ClientPlan(
        client_id=client_id,
        profile=profile,
        cut=best.cut,
        ranks=best.ranks,
        server_ranks=server_ranks,
        memory=client_memory(dims, best.cut, best.ranks, work),
        budget_bytes=budget,
        step_seconds=step_time(profile, server, dims, best.cut, best.ranks, server_ranks,
                               work).total,
        utility=best.utility,
    )


def _server_ranks(dims: ModelDims, cut: int, rank: int) -> dict[str, int]:
    if rank == 0:
        return {}
    return dict.fromkeys(dims.candidate_modules(range(cut, dims.n_layers)), rank)


def _raise_unfit(
    client_id: int, profile: DeviceProfile, dims: ModelDims, work: Workload,
    s: PlannerSettings, fastest: float, time_budget: float,
) -> None:
    who = f"client {client_id} ({profile.name})"
    need = client_memory(dims, s.min_cut, {}, work).frozen_weights
    if need > profile.memory_bytes:
        raise PlanError(
            f"{who}: memory budget {format_bytes(profile.memory_bytes)} misses by "
            f"{format_bytes(need - profile.memory_bytes)}: the smallest configuration (cut "
            f"{s.min_cut}, no adapters) needs {format_bytes(need)} of frozen weights "
            f"(batch {work.batch}, sequence {work.seq}). Give this client more memory in the "
            "scenario, or lower the planner's min_cut."
        )
    raise PlanError(
        f"{who}: step-time budget {time_budget:.3g} s misses by {fastest - time_budget:.3g} s: "
        f"the fastest configuration that fits its memory, without adapters, takes "
        f"{fastest:.3g} s per step. Raise time_budget_s, or shrink batch or sequence length."
    )


def plan_clients(
    profiles: Sequence[DeviceProfile],
    server: DeviceProfile,
    dims: ModelDims,
    importance: Mapping[str, float] | None,
    work: Workload,
    settings: PlannerSettings | None = None,
) -> Plan:
    """Plan every client; client ids are positions in ``profiles``."""
    return Plan([plan_client(i, p, server, dims, importance, work, settings)
                 for i, p in enumerate(profiles)])


def rank_distance(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """``1 - tau_b``: Kendall's rank correlation (ties corrected) of two score maps over
    the union of their names, a missing name scoring 0. 0 = same order, 2 = reversed."""
    names = sorted(set(a) | set(b))
    x = [a.get(n, 0.0) for n in names]
    y = [b.get(n, 0.0) for n in names]
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                ties_x += 1
                ties_y += 1
            elif dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    pairs = len(names) * (len(names) - 1) // 2
    if ties_x == pairs and ties_y == pairs:
        return 0.0  # neither map orders anything: nothing has moved
    if ties_x == pairs or ties_y == pairs:
        return 1.0  # one map has no order at all: no correlation
    tau = (concordant - discordant) / math.sqrt((pairs - ties_x) * (pairs - ties_y))
    return 1.0 - tau


def should_replan(
    old: Mapping[str, float] | None, new: Mapping[str, float], threshold: float
) -> bool:
    """Whether the importance ranking moved by more than ``threshold`` (in ``1 - tau``)."""
    if not old:
        return True
    distance = rank_distance(old, new)
    logger.debug("importance rank distance %.4f (threshold %.4f)", distance, threshold)
    return distance > threshold


def _histogram(ranks: Sequence[int]) -> str:
    counts = Counter(ranks)
    return " ".join(f"{r}×{counts[r]}" for r in sorted(counts, reverse=True))


def format_plan_table(plan: Plan, dims: ModelDims) -> Table:
    """One row per client: cut, rank histogram per matrix type (rank×blocks), memory used
    over budget, estimated step time and covered importance."""
    kinds = list(dict.fromkeys(m.kind for m in dims.candidates))
    server = sorted(set(plan.server_ranks.values()))
    table = Table(
        title="per-client plan",
        caption="ranks: rank×blocks on the client; the server adapts every candidate of "
        "blocks >= cut " + (f"at rank {'/'.join(map(str, server))}" if server else
                            "with no adapters"),
    )
    for column in ("client", "profile", "cut", *kinds):
        table.add_column(column, justify="right" if column == "cut" else "left")
    for column in ("memory / budget", "step", "utility"):
        table.add_column(column, justify="right")
    for c in plan.clients:
        cells = []
        for kind in kinds:
            ranks = [c.ranks.get(dims.module_name(b, m), 0)
                     for b in range(c.cut) for m in dims.candidates if m.kind == kind]
            cells.append(_histogram(ranks) if ranks else "-")
        used = c.memory.total
        table.add_row(
            str(c.client_id), c.profile.name, str(c.cut), *cells,
            f"{format_bytes(used)} / {format_bytes(c.budget_bytes)} "
            f"({used / c.budget_bytes:.0%})",
            f"{c.step_seconds:.3g} s",
            f"{c.utility:.3f}",
        )
    return table
