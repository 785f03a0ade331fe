"""Per-client split point and LoRA ranks that make the run progress fastest per second.

HSplitLoRA's adaptive rank and split-point configuration (ARMSC), reconstructed: the
paper's optimisation is not public (papers notes, section 2.4). The objective, its
reasons and the guarantees are in docs/hsplitlora.md ("ARMSC"); in short:

**Gains.** ``gains[W][r]`` is what a rank-r adapter on matrix W is worth: by default the
energy of W's accumulated gradient that the best rank-r approximation captures,
``sum_{i <= r} sigma_i^2`` (:func:`hsplitlora.hetero.importance.rank_energies`), the
first-order loss decrease of one gradient step restricted to rank r. It is concave in r
because singular values come sorted, and it saturates where the data says, not where a
fixed curve does. :func:`prior_gains` is the uninformed fallback (IWI off): equal or given
scalar weights times ``log2(1 + r) / log2(1 + max Q)``. Gains are normalised by the sum
over every candidate of its gain at the top rank of Q.

**Utility of a client.** ``U = sum_{W < cut} gain_W(r_W) + sum_{W >= cut} gain_W(server_rank)``:
the progress per step of the client's whole training path (its own adapters and the
server's adapters for it).

**Objective.** Rounds are synchronous, as the engine runs them: every local step waits
for the slowest client, every aggregation for the slowest link. For a pair of deadlines,
S per step and A per aggregation, every client maximises U subject to its memory,
``step <= S`` (its compute and transfers, the server's work for it), ``N x server compute
<= S`` (the server serves all N clients one at a time: each an equal share) and
``aggregation <= A`` (its adapter up and, back down, its adapter's size or, with
``merged_download``, the merged updates of its blocks: :func:`merged_downloads`, planned
to a fixed point from two starts, each client's own adapter coming back and no client
adapters, every pass costed from its own merged updates and the fastest kept, or under a
fixed deadline the most progress among those that meet it: one client's ranks raise every
holder's download, which its own choice does not see). The planner picks, over two
geometric grids, the pair with the most first-order progress per simulated second,
``sum_i p_i U_i / (I S + A)``; the plans' round
``T = max(I max_i step_i, I sum_i server_i) + max_i aggregation_i`` is what the plan
reports, and ``Plan.objective`` is ``sum_i p_i U_i / T``. ``PlannerSettings.round_time_s``
fixes one deadline R for each client's own ``I x step + aggregation`` instead (``inf``:
memory only).

**Algorithm.** For every cut k and first adapted block f (f = k: no adapters) the fixed
cost is the frozen weights of k blocks plus the activations of blocks ``[f, k)`` with the
inputs of every candidate reserved (an upper bound of what any plan over those blocks
keeps). Every step of a matrix from one rank of Q to the next then costs ``dr x`` its
per-rank bytes, FLOPs and adapter bytes; steps are sorted once by gain per byte and each
(k, f) takes the longest prefix of its blocks' steps that fits memory, round and step time.
Concave gains make a matrix's steps come in rank order. The table of prefixes is built
once for all clients, then each client is a few array operations per deadline (100
clients of a 32-block model: seconds).

**Guarantees** (tested): with memory binding, the prefix is within one step's gain of the
best plan for its (k, f) and reservation (the fractional optimum is the prefix plus part of
the first step that does not fit; with the deadline binding too this is observed, not
proved); at a fixed deadline, more memory never lowers a client's U; at a fixed cut,
scaling up a matrix's gains never lowers its rank; choosing R, more memory for one client
never lowers the best ``sum_i p_i U_i(R) / R`` (the grid does not depend on memory).

**U-shaped split** (``PlannerSettings.tail``): every client also keeps the last ``tail``
blocks, the final norm, the head and the loss. Their frozen weights, activations and
FLOPs are part of every option's fixed cost, their matrices are the client's to adapt
(eligible in every option, like blocks ``[f, k)``), the server's adapters cover
``[k, L - tail)`` only, and each step moves two transfers each way. The server's share
of the round counts its FLOPs, not the time it holds a client's step while the tail runs
(the simulated clock does).

**The server's rank** (``PlannerSettings.server_rank``): fixed, or (None) planned with
the rest: every positive rank of Q is planned for as above and the plans that progress
fastest kept, ties to the smaller rank. Its adapters are worth their gains on every block
the server holds for a client and cost the server's memory and its share of each step; a
rank whose adapters the server cannot hold is skipped.

**Tie-breaking.** Options of equal U (to 1e-9) go to the shallower cut, then to the
smaller memory reservation; deadlines of equal Phi to the shorter round.

**Re-planning.** :func:`should_replan` compares two importance maps by the Kendall tau-b
rank correlation over the union of their names (a missing name scores 0); re-plan when
``1 - tau`` (0 = same order, 1 = unrelated, 2 = reversed) exceeds a threshold.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from rich.table import Table

from hsplitlora.errors import UserError
from hsplitlora.hetero.costmodel import (
    MemoryBreakdown,
    ModelDims,
    Workload,
    activation_bytes,
    adapter_bytes,
    block_flops,
    bytes_down,
    bytes_up,
    client_flops,
    client_memory,
    lora_flops_per_rank,
    lora_memory_per_rank,
    server_flops,
    server_memory,
    step_time,
)
from hsplitlora.hetero.profiles import DeviceProfile, format_bytes
from hsplitlora.models.structure import client_blocks

__all__ = [
    "merged_downloads",
    "DEFAULT_RANKS",
    "ClientPlan",
    "Plan",
    "PlanError",
    "PlannerSettings",
    "RankGains",
    "ServerLoad",
    "format_plan_table",
    "plan_client",
    "plan_clients",
    "prior_gains",
    "rank_distance",
    "server_load",
    "rank_gain",
    "should_replan",
]

logger = logging.getLogger(__name__)

DEFAULT_RANKS = (0, 2, 4, 8, 16)
_TIE = 1e-9

RankGains = Mapping[str, Mapping[int, float]]  # module name -> {rank: gain of that rank}


class PlanError(UserError, ValueError):
    """A client cannot run even the smallest configuration within its budgets."""


@dataclass(frozen=True)
class PlannerSettings:
    """Choices the planner works within."""

    ranks: tuple[int, ...] = DEFAULT_RANKS  # Q: candidate ranks, 0 = no adapter
    min_cut: int = 1  # the client always runs at least this many blocks
    max_cut: int | None = None  # None: all but the last block
    # rank of the server's adapters on blocks [cut, L); 0 = none; None = planned: the
    # positive rank of Q whose plans progress fastest
    server_rank: int | None = 8
    time_budget_s: float | None = None  # hard per-step latency limit; None = unlimited
    interval: int = 10  # I: local steps per aggregation (adapters travel once per I steps)
    round_time_s: float | None = None  # fixed round deadline R; None = chosen; inf = memory only
    deadlines: int = 64  # deadlines tried between the fastest and the slowest round
    shared_server: bool = False  # one server-side adapter per block for every client
    tail: int = 0  # U-shaped split: every client also keeps the last `tail` blocks and the head
    # A merging aggregator (noise-free, stacking): at each aggregation a client downloads
    # the merged update of every matrix of its blocks, not its own adapter back
    merged_download: bool = False

    def __post_init__(self) -> None:
        if sorted(set(self.ranks)) != list(self.ranks) or self.ranks[0] != 0 or len(self.ranks) < 2:
            raise ValueError(
                f"planner ranks must be increasing, start at 0 (no adapter) and hold at least "
                f"one positive rank, e.g. {DEFAULT_RANKS}; got {self.ranks}"
            )
        if (self.server_rank is not None and self.server_rank < 0) or self.min_cut < 0:
            raise ValueError("server_rank and min_cut must be >= 0")
        if self.max_cut is not None and self.max_cut < self.min_cut:
            raise ValueError(f"max_cut {self.max_cut} is below min_cut {self.min_cut}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be positive, got {self.time_budget_s}")
        if self.round_time_s is not None and not self.round_time_s > 0:
            raise ValueError(f"round_time_s must be positive, got {self.round_time_s}")
        if self.interval < 1 or self.deadlines < 1:
            raise ValueError("interval and deadlines must be >= 1")
        if self.tail < 0:
            raise ValueError(f"tail must be >= 0, got {self.tail}")

    @property
    def gain_ranks(self) -> tuple[int, ...]:
        """The ranks a gain map must cover: Q and the server's rank."""
        return tuple(sorted({*self.ranks, *([] if self.server_rank is None
                                            else [self.server_rank])}))


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
    utility: float  # U: normalised gain of client and server adapters
    round_seconds: float = float("nan")  # I steps and one adapter upload + download
    server_seconds: float = float("nan")  # the main server's compute per step for this client
    aggregation_seconds: float = float("nan")  # its adapter up, the aggregate down


@dataclass(frozen=True)
class ServerLoad:
    """What the main server spends on all clients: one shared frozen base, each client's
    server-side adapters with their gradients and AdamW moments, the activations of one
    step at a time (it serves clients one after another)."""

    memory_bytes: int
    budget_bytes: int
    compute_seconds: float  # per round: I steps of every client


@dataclass(frozen=True)
class Plan:
    clients: list[ClientPlan] = field(default_factory=list)
    round_seconds: float = float("nan")  # max(slowest client's round, server's round)
    objective: float = float("nan")  # sum_i p_i U_i / round_seconds: progress per second
    server: ServerLoad | None = None

    @property
    def server_ranks(self) -> dict[str, int]:
        """Every adapter the server holds for some client (highest rank asked)."""
        out: dict[str, int] = {}
        for c in self.clients:
            for name, rank in c.server_ranks.items():
                out[name] = max(rank, out.get(name, 0))
        return out


def rank_gain(rank: int, max_rank: int) -> float:
    """g(r) = log2(1 + r) / log2(1 + r_max): the uninformed prior, 0 to 1."""
    return math.log2(1 + rank) / math.log2(1 + max_rank)


def prior_gains(
    dims: ModelDims, ranks: Sequence[int], importance: Mapping[str, float] | None = None
) -> dict[str, dict[int, float]]:
    """Gains without a measured spectrum: ``w(W) g(r)`` with scalar scores w clipped at 0
    (every candidate 1 when ``importance`` is None or all 0) and g :func:`rank_gain`."""
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
    if not any(raw.values()):
        logger.warning("all importance scores are 0: weighting every candidate matrix equally")
        raw = dict.fromkeys(names, 1.0)
    top = max(ranks)
    return {n: {r: w * rank_gain(r, top) for r in ranks} for n, w in raw.items()}


def _normalised(dims: ModelDims, gains: RankGains | None, s: PlannerSettings
                ) -> dict[str, dict[int, float]]:
    """Checked gains, scaled so the top rank of Q on every candidate sums to 1."""
    need = s.gain_ranks
    if gains is None:
        gains = prior_gains(dims, need)
    names = dims.candidate_modules()
    unknown = [n for n in gains if n not in names]
    if unknown:
        raise ValueError(f"gains name {len(unknown)} module(s) that are not candidate matrices, "
                         f"e.g. {unknown[0]!r}; expected full module names such as "
                         f"{next(iter(names))!r}")
    out: dict[str, dict[int, float]] = {}
    for n in names:
        g = gains.get(n, {})
        missing = [r for r in need if r not in g and r != 0]
        if g and missing:
            raise ValueError(f"gains of {n} lack rank(s) {missing}: give the gain at every rank "
                             f"of Q and the server's rank {need}")
        values = [float(g.get(r, 0.0)) if r else 0.0 for r in need]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"gains of {n} must be finite, got {values}")
        out[n] = dict(zip(need, values, strict=True))
        if not _concave([out[n][r] for r in s.ranks], s.ranks):
            raise ValueError(f"gains of {n} must rise with rank, each rank adding no more than "
                             f"the one before (a sorted spectrum does): got {out[n]}")
    total = sum(g[s.ranks[-1]] for g in out.values())
    if total <= 0:
        logger.warning("every gain is 0: weighting every candidate matrix equally")
        return _normalised(dims, None, s)
    return {n: {r: v / total for r, v in g.items()} for n, g in out.items()}


def _concave(values: Sequence[float], ranks: Sequence[int]) -> bool:
    """Non-decreasing, with non-increasing gain per unit rank between the ranks of Q."""
    slopes = [(b - a) / (rb - ra) for a, b, ra, rb
              in zip(values, values[1:], ranks, ranks[1:], strict=False)]
    tol = 1e-9 * max(map(abs, values), default=0.0)
    return all(x >= -tol for x in slopes) and all(
        y <= x + tol for x, y in zip(slopes, slopes[1:], strict=False))


@dataclass(frozen=True)
class _Table:
    """Everything about the plans that does not depend on the client: rank steps sorted
    by gain per byte, and per (cut, first adapted block) option the prefix sums of the
    steps it may take (steps of other blocks add 0)."""

    names: list[str]  # per step
    levels: np.ndarray  # per step: index in Q after the step
    cut: np.ndarray  # per option; options sorted by (cut, reserved bytes)
    first: np.ndarray
    reserved: np.ndarray  # frozen weights + reserved activations, bytes
    client_flops: np.ndarray  # per step, adapters aside
    server_flops: np.ndarray  # per step, the server's adapters included
    served: np.ndarray  # gain of the server's adapters on blocks [cut, L)
    eligible: np.ndarray  # [option, step]
    cum_gain: np.ndarray  # [option, step]
    cum_bytes: np.ndarray
    cum_flops: np.ndarray
    cum_params: np.ndarray


def _table(dims: ModelDims, gains: Mapping[str, Mapping[int, float]], work: Workload,
           s: PlannerSettings, max_cut: int) -> _Table:
    q = s.ranks
    rows = []
    for block in range(dims.n_layers):
        for matrix in dims.candidates:
            name = dims.module_name(block, matrix)
            g = gains[name]
            per_byte = lora_memory_per_rank(matrix, work)
            per_flop = lora_flops_per_rank(matrix, work).total
            for j in range(len(q) - 1):
                gain, dr = g[q[j + 1]] - g[q[j]], q[j + 1] - q[j]
                if gain <= 0:
                    break  # gains are concave: nothing more to gain on this matrix
                rows.append((-gain / (dr * per_byte), -g[q[-1]], block, name, j + 1, gain,
                             dr * per_byte, dr * per_flop, dr * matrix.lora_params(1)))
    rows.sort()
    blocks = np.array([r[2] for r in rows], dtype=np.int64)
    columns = [np.array([r[i] for r in rows], dtype=np.float64) for i in (5, 6, 7, 8)]
    block = block_flops(dims, work)
    served_per_block = [sum(gains[dims.module_name(b, m)][s.server_rank] for m in dims.candidates)
                        for b in range(dims.n_layers)]
    stop = dims.n_layers - s.tail  # the server's blocks end here (a U-shaped client's tail)
    tail_flops, tail_reserve = _tail_costs(dims, work, s.tail)
    options = []
    for cut in range(s.min_cut, max_cut + 1):
        # frozen weights, the hidden state sent, and a tail's weights and activations
        frozen = client_memory(dims, cut, {}, work, s.tail).total + tail_reserve
        served = server_flops(dims, cut, _server_ranks(dims, cut, s.server_rank, s.tail), work,
                              s.tail).total
        for first in range(cut, -1, -1):
            reserved = frozen + activation_bytes(dims, range(first, cut), {}, work,
                                                 input_grad=False, reserve_inputs=True)
            options.append((cut, reserved, first, cut * block.forward
                            + (cut - first) * block.backward + tail_flops, served,
                            sum(served_per_block[cut:stop])))
    options.sort(key=lambda o: (o[0], o[1], -o[2]))
    cut_, reserved_, first_ = (np.array([o[i] for o in options], dtype=np.int64) for i in range(3))
    # a step may adapt the blocks [first, cut) and, in a U-shaped split, the client's tail
    eligible = ((blocks[None, :] >= first_[:, None]) & (blocks[None, :] < cut_[:, None])
                | (blocks[None, :] >= stop))
    cums = [np.cumsum(np.where(eligible, c[None, :], 0.0), axis=1) for c in columns]
    return _Table(
        names=[r[3] for r in rows], levels=np.array([r[4] for r in rows], dtype=np.int64),
        cut=cut_, first=first_, reserved=reserved_.astype(np.float64),
        client_flops=np.array([o[3] for o in options], dtype=np.float64),
        server_flops=np.array([o[4] for o in options], dtype=np.float64),
        served=np.array([o[5] for o in options], dtype=np.float64),
        eligible=eligible, cum_gain=cums[0], cum_bytes=cums[1], cum_flops=cums[2],
        cum_params=cums[3],
    )


def _tail_costs(dims: ModelDims, work: Workload, tail: int) -> tuple[int, int]:
    """A U-shaped client's tail (blocks ``[L - tail, L)``, final norm, head, loss): its
    FLOPs per step without adapters, and the inputs of its candidate matrices reserved as
    if all were adapted (what the blocks ``[first, cut)`` reserve, for the tail: an upper
    bound additive in ranks). Its frozen weights and activations are in client_memory."""
    if not tail:
        return 0, 0
    n = dims.n_layers
    flops = client_flops(dims, 0, {}, work, tail).total - client_flops(dims, 0, {}, work).total
    blocks = range(n - tail, n)
    reserve = (activation_bytes(dims, blocks, {}, work, input_grad=True, reserve_inputs=True)
               - activation_bytes(dims, blocks, {}, work, input_grad=True))
    return flops, reserve


@dataclass(frozen=True)
class _Client:
    """One client's best option at each deadline (-inf utility where none fits)."""

    option: np.ndarray
    taken: np.ndarray  # steps of the prefix
    utility: np.ndarray
    round_seconds: np.ndarray
    server_seconds: np.ndarray  # per step
    step_seconds: np.ndarray | None = None  # synchronous rounds: the client's step
    agg_seconds: np.ndarray | None = None  # and its aggregation


@dataclass(frozen=True)
class _Rates:
    """A client's seconds per FLOP, per byte sent and per adapter parameter moved, and
    per aggregation the download every option's cut costs it regardless of its adapters
    (the merged updates of its blocks; zeros when it gets its own adapter back)."""

    flop: float
    transfer: float  # activations up and gradient down, per step
    param: float  # one adapter parameter up (and down, without merged downloads)
    server_flop: float
    download: np.ndarray  # [L + 1] seconds per aggregation by cut

    @classmethod
    def of(cls, profile: DeviceProfile, server: DeviceProfile, dims: ModelDims,
           work: Workload, tail: int = 0, merged: Sequence[float] | None = None) -> _Rates:
        """``merged``: bytes per block of the merged update a holder downloads (None: each
        client gets its own adapter back, at its size)."""
        up = min(profile.uplink_bps, server.downlink_bps)
        down = min(server.uplink_bps, profile.downlink_bps)
        n = dims.n_layers
        download = np.zeros(n + 1)
        if merged is not None:
            for cut in range(n + 1):
                download[cut] = sum(merged[b] for b in client_blocks(cut, tail, n)
                                    if b < n) / down
        return cls(
            flop=1 / profile.flops,
            transfer=bytes_up(work.batch, work.seq, dims.hidden, work.act_bytes, tail) / up
            + bytes_down(work.batch, work.seq, dims.hidden, work.act_bytes, tail) / down,
            param=work.lora_bytes * (1 / up + (0 if merged is not None else 1 / down)),
            server_flop=1 / server.flops,
            download=download,
        )


def merged_downloads(plans: Sequence[ClientPlan], dims: ModelDims,
                     shared_server: bool = False) -> list[float]:
    """Per block, the bytes a client that holds it downloads at a merging aggregation: for
    each matrix the merged update as it is sent (:func:`~hsplitlora.aggregate.
    dense_or_factors`), ``min(d_out d_in, R (d_in + d_out))`` fp32 values, where ``R`` sums
    every contributor's rank on it: the clients' adapters, and the server side's (one
    shared adapter at its widest rank, or one copy per participant)."""
    ranks: dict[str, int] = {}
    for c in plans:
        for m, r in c.ranks.items():
            ranks[m] = ranks.get(m, 0) + r
    server: dict[str, int] = {}
    for c in plans:
        for m, r in c.server_ranks.items():
            server[m] = max(server.get(m, 0), r) if shared_server else server.get(m, 0) + r
    out = [0.0] * dims.n_layers
    for m in set(ranks) | set(server):
        block, matrix = dims.locate(m)
        total = ranks.get(m, 0) + server.get(m, 0)
        out[block] += 4.0 * min(matrix.d_out * matrix.d_in, matrix.lora_params(total))
    return out


def _fixed(t: _Table, rates: _Rates) -> tuple[np.ndarray, np.ndarray]:
    """Per option: step seconds without client adapters, and the server's share of it."""
    server = t.server_flops * rates.server_flop
    return t.client_flops * rates.flop + rates.transfer + server, server


def _downloads(t: _Table, rates: _Rates) -> np.ndarray:
    """Per option: seconds of the merged updates its cut downloads at each aggregation."""
    return rates.download[t.cut]


def _evaluate(t: _Table, profile: DeviceProfile, rates: _Rates, s: PlannerSettings,
              n_clients: int, deadlines: np.ndarray, adapters: bool = True) -> _Client:
    interval = s.interval
    step0, server = _fixed(t, rates)
    mem_left = profile.memory_bytes - t.reserved
    n_mem = (t.cum_bytes <= mem_left[:, None]).sum(axis=1) * adapters
    if s.time_budget_s is None:
        n_step = np.full_like(n_mem, t.cum_gain.shape[1])
        step_ok = np.ones(len(step0), dtype=bool)
    else:
        step_left = s.time_budget_s - step0
        n_step = (t.cum_flops * rates.flop <= step_left[:, None]).sum(axis=1)
        step_ok = step_left >= 0
    tau = interval * t.cum_flops * rates.flop + t.cum_params * rates.param  # [O, S]
    fetch = _downloads(t, rates)
    round_left = deadlines[None, :] - (interval * step0 + fetch)[:, None]  # [O, D]
    if np.isinf(deadlines).all():
        n_time = np.full(round_left.shape, tau.shape[1])
    else:
        n_time = (tau[:, :, None] <= round_left[:, None, :]).sum(axis=1)
    taken = np.minimum(np.minimum(n_mem, n_step)[:, None], n_time)  # [O, D]
    last = np.maximum(taken - 1, 0)
    some = taken > 0

    def at(cum: np.ndarray) -> np.ndarray:
        return np.where(some, np.take_along_axis(cum, last, axis=1), 0.0)

    utility = t.served[:, None] + at(t.cum_gain)
    agg = at(t.cum_params) * rates.param + fetch[:, None]
    rounds = interval * (step0[:, None] + at(t.cum_flops) * rates.flop) + agg
    ok = ((mem_left >= 0) & step_ok)[:, None] & (round_left >= 0) \
        & (n_clients * interval * server[:, None] <= deadlines[None, :] * (1 + 1e-12))
    utility = np.where(ok, utility, -np.inf)
    top = utility.max(axis=0)
    option = np.argmax(utility >= top[None, :] - _TIE, axis=0)  # options sorted by preference
    cols = np.arange(len(deadlines))
    return _Client(option, taken[option, cols], top, rounds[option, cols], server[option],
                   agg_seconds=agg[option, cols])


def _evaluate_sync(t: _Table, profile: DeviceProfile, rates: _Rates, s: PlannerSettings,
                   n_clients: int, steps: np.ndarray, aggs: np.ndarray,
                   adapters: bool = True) -> _Client:
    """:func:`_evaluate` for synchronous rounds: at each pair ``(steps[p], aggs[p])`` the
    client's step (compute, its transfers, the server's share) must fit the step deadline
    and its aggregation (adapter up, what comes down) the aggregation deadline, since
    every local step waits for the slowest client and every aggregation for the slowest
    link. ``round_seconds`` is the client's own ``I x step + aggregation``."""
    interval = s.interval
    step0, server = _fixed(t, rates)
    fetch = _downloads(t, rates)
    mem_left = profile.memory_bytes - t.reserved
    n_mem = (t.cum_bytes <= mem_left[:, None]).sum(axis=1)
    budget = np.inf if s.time_budget_s is None else s.time_budget_s
    flops = t.cum_flops * rates.flop  # [O, K], non-decreasing along K
    params = t.cum_params * rates.param
    taken = np.zeros((len(step0), len(steps)), dtype=np.int64)  # [O, P]
    if adapters:
        # The pairs are a grid: count the prefixes that fit each distinct deadline once.
        step_at, step_of = np.unique(np.minimum(steps, budget), return_inverse=True)
        agg_at, agg_of = np.unique(aggs, return_inverse=True)
        for o in range(len(step0)):
            n_step = np.searchsorted(flops[o], step_at - step0[o], side="right")[step_of]
            n_agg = np.searchsorted(params[o], agg_at - fetch[o], side="right")[agg_of]
            taken[o] = np.minimum(np.minimum(n_step, n_agg), n_mem[o])
    ok = ((mem_left >= 0) & (step0 <= budget))[:, None] \
        & (step0[:, None] <= steps[None, :]) & (fetch[:, None] <= aggs[None, :]) \
        & (n_clients * server[:, None] <= steps[None, :] * (1 + 1e-12))
    rows = (np.arange(len(step0)) * (t.cum_gain.shape[1] + 1))[:, None]
    gain = _after(t.cum_gain, taken + rows) if adapters else 0.0
    utility = np.where(ok, t.served[:, None] + gain, -np.inf)
    top = utility.max(axis=0)
    option = np.argmax(utility >= top[None, :] - _TIE, axis=0)
    chosen = taken[option, np.arange(len(steps))]
    flat = chosen + rows[option, 0]
    step = step0[option] + _after(t.cum_flops, flat) * rates.flop
    agg = _after(t.cum_params, flat) * rates.param + fetch[option]
    return _Client(option, chosen, top, interval * step + agg, server[option], step, agg)


def _after(cum: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Per-option prefix sums ``cum`` [O, K] read after ``n`` steps (0 for none), at flat
    indices ``row * (K + 1) + n``: one take from the sums with a zero column in front,
    far cheaper than ``take_along_axis`` over every option and deadline pair."""
    return np.pad(cum, ((0, 0), (1, 0))).ravel().take(flat)


def _pairs(t: _Table, clients: Sequence[tuple[DeviceProfile, _Rates]],
           s: PlannerSettings) -> tuple[np.ndarray, np.ndarray]:
    """The (step, aggregation) deadline pairs to try: geometric grids from the slowest
    client's fastest step (and the server's equal share of it) and its cheapest
    aggregation up to what the most expensive plan could take; every pair of the two.
    Memory plays no part, as in :func:`_deadlines`."""
    n = len(clients)
    lo_s = hi_s = lo_a = hi_a = 0.0
    budget = np.inf if s.time_budget_s is None else s.time_budget_s
    for _, rates in clients:
        step0, server = _fixed(t, rates)
        floor = np.where(step0 <= budget, np.maximum(step0, n * server), np.inf)
        fetch = _downloads(t, rates)
        lo_s = max(lo_s, float(floor.min()))
        full = np.maximum(step0 + t.cum_flops[:, -1] * rates.flop, n * server)
        hi_s = max(hi_s, float(full[np.isfinite(floor)].max(initial=0.0)))
        lo_a = max(lo_a, float(fetch[np.isfinite(floor)].min(initial=0.0)))
        hi_a = max(hi_a, float((fetch + t.cum_params[:, -1] * rates.param).max()))
    steps = (np.array([lo_s]) if not math.isfinite(lo_s) or hi_s <= lo_s
             else np.geomspace(lo_s, hi_s, s.deadlines))
    if hi_a <= 0:
        aggs = np.zeros(1)
    else:
        aggs = np.geomspace(max(lo_a, hi_a * 1e-4), hi_a, max(8, s.deadlines // 2))
        if lo_a == 0:
            aggs = np.concatenate([[0.0], aggs])
    grid_s, grid_a = np.meshgrid(steps, aggs, indexing="ij")
    return grid_s.ravel(), grid_a.ravel()


def _deadlines(t: _Table, clients: Sequence[tuple[DeviceProfile, _Rates]],
               s: PlannerSettings) -> np.ndarray:
    """The deadlines to try, geometric from the slowest client's fastest round to the
    longest round any plan could take. Memory plays no part, so a larger budget never
    changes the grid (which is what keeps the objective monotone in memory)."""
    if s.round_time_s is not None:
        return np.array([s.round_time_s])
    n, interval = len(clients), s.interval
    lo = hi = 0.0
    for _, rates in clients:
        step0, server = _fixed(t, rates)
        floor = np.maximum(interval * step0 + _downloads(t, rates), n * interval * server)
        if s.time_budget_s is not None:
            floor = np.where(step0 <= s.time_budget_s, floor, np.inf)
        full = interval * t.cum_flops[:, -1] * rates.flop + t.cum_params[:, -1] * rates.param
        lo = max(lo, float(floor.min()))
        hi = max(hi, float((floor + full)[np.isfinite(floor)].max(initial=0.0)))
    if not math.isfinite(lo) or hi <= lo:
        return np.array([lo])
    return np.geomspace(lo, hi, s.deadlines)


def plan_clients(
    profiles: Sequence[DeviceProfile],
    server: DeviceProfile,
    dims: ModelDims,
    gains: RankGains | None,
    work: Workload,
    settings: PlannerSettings | None = None,
    shares: Sequence[float] | None = None,
) -> Plan:
    """Plan every client (ids are positions in ``profiles``; ``shares`` p_i weigh their
    utilities in the objective, equal when None); see the module docstring."""
    s = settings or PlannerSettings()
    if not profiles:
        raise ValueError("plan_clients needs at least one client profile")
    if s.server_rank is None:
        return _plan_server_rank(profiles, server, dims, gains, work, s, shares)
    top = dims.n_layers - s.tail - 1 if s.tail else dims.n_layers  # a middle block stays
    max_cut = min(dims.n_layers - 1, top) if s.max_cut is None else s.max_cut
    if not 0 <= s.min_cut <= max_cut <= top:
        raise ValueError(f"planner cut range [{s.min_cut}, {max_cut}] does not fit a model of "
                         f"{dims.n_layers} blocks" + (f" with a tail of {s.tail}" if s.tail
                                                      else "")
                         + f": it must lie within [0, {top}]")
    p = np.full(len(profiles), 1 / len(profiles)) if shares is None else \
        np.asarray(shares, dtype=np.float64) / math.fsum(shares)
    norm = _normalised(dims, gains, s)
    t = _table(dims, norm, work, s, max_cut)
    if not s.merged_download:
        return _plan_all(profiles, server, dims, work, s, p, t, None)
    # Each client's download depends on everyone's ranks: plan, cost the merged updates
    # those plans send, plan again, until the plans repeat (or after a few rounds). A
    # client's ranks raise every holder's download, which its own choice does not see, so
    # the passes can settle where every client adapts a block that all of them then
    # download densely; passes that start from no client adapters find the plans that
    # avoid it. Every pass is costed as it would run (its own merged downloads), and the
    # one that progresses fastest is the plan.
    passes = []
    for adapters in (True, False):
        plan = _plan_all(profiles, server, dims, work, s, p, t, None, adapters)
        seen = [_shape(plan)]
        passes.append(plan)
        for _ in range(_MERGED_ITERATIONS):
            plan = _plan_all(profiles, server, dims, work, s, p, t,
                             merged_downloads(plan.clients, dims, s.shared_server), adapters)
            passes.append(plan)
            if _shape(plan) in seen:
                break
            seen.append(_shape(plan))
    return _best([_as_run(plan, server, dims, work, s, p) for plan in passes], s)


def _best(plans: Sequence[Plan], s: PlannerSettings) -> Plan:
    """The plan that progresses fastest (the first of equals), or under a fixed deadline
    the most progress among those whose rounds, as run, meet it."""
    if s.round_time_s is None:
        return max(plans, key=lambda c: c.objective)
    deadline = s.round_time_s
    return max(plans, key=lambda c: (c.round_seconds <= deadline,
                                     c.objective * c.round_seconds))


def _plan_server_rank(profiles: Sequence[DeviceProfile], server: DeviceProfile,
                      dims: ModelDims, gains: RankGains | None, work: Workload,
                      s: PlannerSettings, shares: Sequence[float] | None) -> Plan:
    """The server's rank planned too: every positive rank of Q is planned for and the
    fastest-progressing plans kept (ties to the smaller rank). The server's adapters are
    worth their gains on every block it holds and cost its memory (once when shared, per
    client otherwise) and its share of every step; a rank the server cannot hold is
    skipped, and when none fits, the smallest one's error is raised."""
    plans, errors = [], []
    for rank in (r for r in s.ranks if r > 0):
        try:
            plans.append(plan_clients(profiles, server, dims, gains, work,
                                      replace(s, server_rank=rank), shares))
        except PlanError as e:
            errors.append(e)
    if not plans:
        raise errors[0]
    return _best(plans, s)


_MERGED_ITERATIONS = 4


def _as_run(plan: Plan, server: DeviceProfile, dims: ModelDims, work: Workload,
            s: PlannerSettings, p: np.ndarray) -> Plan:
    """``plan`` with its aggregations, rounds and objective costed from the merged updates
    its own ranks send (a pass plans against the previous pass's)."""
    clients = with_aggregations(plan.clients, server, dims, work, s.interval, s.tail,
                                merged_downloads(plan.clients, dims, s.shared_server))
    if s.round_time_s is None:
        rounds = synchronous_round(clients, s.interval)
    else:
        rounds = max(max(c.round_seconds for c in clients),
                     s.interval * sum(c.server_seconds for c in clients))
    progress = float(np.dot(p, [c.utility for c in clients]))
    return replace(plan, clients=clients, round_seconds=rounds, objective=progress / rounds)


def with_aggregations(clients: Sequence[ClientPlan], server: DeviceProfile, dims: ModelDims,
                      work: Workload, interval: int, tail: int,
                      merged: Sequence[float] | None) -> list[ClientPlan]:
    """``clients`` with each one's aggregation (its adapter up; back down its adapter, or
    with ``merged`` per block the merged updates of the blocks it holds) and its own round
    (``interval`` steps and that aggregation)."""
    out = []
    for c in clients:
        up = min(c.profile.uplink_bps, server.downlink_bps)
        down = min(server.uplink_bps, c.profile.downlink_bps)
        sent = adapter_bytes(dims, c.ranks, work)
        fetched = sent if merged is None else sum(
            merged[b] for b in client_blocks(c.cut, tail, dims.n_layers))
        aggregation = sent / up + fetched / down
        out.append(replace(c, aggregation_seconds=aggregation,
                           round_seconds=interval * c.step_seconds + aggregation))
    return out


def synchronous_round(clients: Sequence[ClientPlan], interval: int) -> float:
    """The round the engine runs: ``interval`` steps that each wait for the slowest
    client or for the server serving everyone, whichever is longer, then the aggregation
    that waits for the slowest link."""
    steps = interval * max(c.step_seconds for c in clients)
    served = interval * sum(c.server_seconds for c in clients)
    return max(steps, served) + max(c.aggregation_seconds for c in clients)


def _shape(plan: Plan) -> tuple[tuple[int, tuple[tuple[str, int], ...]], ...]:
    return tuple((c.cut, tuple(sorted(c.ranks.items()))) for c in plan.clients)


def _plan_all(profiles: Sequence[DeviceProfile], server: DeviceProfile, dims: ModelDims,
              work: Workload, s: PlannerSettings, p: np.ndarray, t: _Table,
              merged: Sequence[float] | None, adapters: bool = True) -> Plan:
    """One pass of the planner over every client, with the merged downloads ``merged``
    (per block; None: each client's own adapter comes back); without ``adapters`` every
    client only chooses its cut."""
    clients = [(prof, _Rates.of(prof, server, dims, work, s.tail, merged))
               for prof in profiles]
    for i, (prof, rates) in enumerate(clients):
        _check_fits(i, prof, t, rates, s, work)
    if s.round_time_s is None:  # synchronous rounds, the deadlines chosen
        steps, aggs = _pairs(t, clients, s)
        deadlines = s.interval * steps + aggs
        per = [_evaluate_sync(t, prof, rates, s, len(profiles), steps, aggs, adapters)
               for prof, rates in clients]
    else:  # a fixed round deadline that every client's own round must meet
        deadlines = _deadlines(t, clients, s)
        per = [_evaluate(t, prof, rates, s, len(profiles), deadlines, adapters)
               for prof, rates in clients]
    utility = np.array([c.utility for c in per])  # [N, D]
    feasible = np.isfinite(utility).all(axis=0)
    if not feasible.any():
        worst = next(i for i, c in enumerate(per) if not np.isfinite(c.utility[-1]))
        _raise_late(worst, profiles[worst], t, clients[worst][1], s, len(profiles),
                    float(deadlines[-1]))
    served = s.interval * np.array([c.server_seconds for c in per]).sum(axis=0)
    if s.round_time_s is None:  # every step waits for the slowest, every aggregation too
        rounds = (np.maximum(s.interval * np.array([c.step_seconds for c in per]).max(axis=0),
                             served)
                  + np.array([c.agg_seconds for c in per]).max(axis=0))
    else:
        rounds = np.maximum(np.array([c.round_seconds for c in per]).max(axis=0), served)
    progress = (p[:, None] * np.where(feasible, utility, 0.0)).sum(axis=0)
    # Chosen by progress over the deadline, not over the round the plans take (at most the
    # deadline): over a grid that memory does not move, this is what makes more memory
    # never lower the objective. The grid is fine enough for the two to differ little.
    per_deadline = np.where(feasible, progress / deadlines if len(deadlines) > 1 else progress,
                            -np.inf)
    best = int(np.argmax(per_deadline >= per_deadline.max() - _TIE * abs(per_deadline.max())))
    plans = [_client_plan(i, prof, server, dims, t, c, best, s, work)
             for i, ((prof, _), c) in enumerate(zip(clients, per, strict=True))]
    load = _server_load(plans, server, dims, work, s)
    return Plan(plans, round_seconds=float(rounds[best]),
                objective=float(progress[best] / rounds[best]), server=load)


def plan_client(
    client_id: int,
    profile: DeviceProfile,
    server: DeviceProfile,
    dims: ModelDims,
    gains: RankGains | None,
    work: Workload,
    settings: PlannerSettings | None = None,
) -> ClientPlan:
    """The plan of one client that has the server to itself."""
    plan = plan_clients([profile], server, dims, gains, work, settings).clients[0]
    return replace(plan, client_id=client_id)


def _client_plan(cid: int, profile: DeviceProfile, server: DeviceProfile, dims: ModelDims,
                 t: _Table, c: _Client, d: int, s: PlannerSettings, work: Workload
                 ) -> ClientPlan:
    option, taken = int(c.option[d]), int(c.taken[d])
    level: dict[str, int] = {}
    for step in np.flatnonzero(t.eligible[option, :taken]):
        name = t.names[step]
        level[name] = max(level.get(name, 0), int(t.levels[step]))
    ranks = {name: s.ranks[j] for name, j in level.items()}
    cut = int(t.cut[option])
    server_ranks = _server_ranks(dims, cut, s.server_rank, s.tail)
    return ClientPlan(
        client_id=cid, profile=profile, cut=cut, ranks=ranks, server_ranks=server_ranks,
        memory=client_memory(dims, cut, ranks, work, s.tail), budget_bytes=profile.memory_bytes,
        step_seconds=step_time(profile, server, dims, cut, ranks, server_ranks, work,
                               s.tail).total,
        utility=float(c.utility[d]), round_seconds=float(c.round_seconds[d]),
        server_seconds=float(c.server_seconds[d]),
        aggregation_seconds=float(c.agg_seconds[d]) if c.agg_seconds is not None
        else float("nan"),
    )


def server_load(plans: Sequence[ClientPlan], server: DeviceProfile, dims: ModelDims,
                work: Workload, interval: int, *, shared: bool = False,
                tail: int = 0) -> ServerLoad:
    """The main server's memory and compute per round (``interval`` steps per client)
    under ``plans``: one frozen base, one client's activations at a time, and each
    client's server-side adapters with their AdamW state, or (``shared``) one adapter per
    block, the widest server side's; with a ``tail``, middles that end at ``L - tail``."""
    memories = [server_memory(dims, c.cut, c.server_ranks, work, tail) for c in plans]
    adapters = [m.lora_weights + m.lora_grads + m.optimizer for m in memories]
    total = (max(m.frozen_weights for m in memories)
             + max(m.activations + m.exchanged for m in memories)
             + (max(adapters) if shared else sum(adapters)))
    return ServerLoad(total, server.memory_bytes,
                      interval * sum(c.server_seconds for c in plans))


def _server_load(plans: Sequence[ClientPlan], server: DeviceProfile, dims: ModelDims,
                 work: Workload, s: PlannerSettings) -> ServerLoad:
    load = server_load(plans, server, dims, work, s.interval, shared=s.shared_server,
                       tail=s.tail)
    if load.memory_bytes > server.memory_bytes:
        raise PlanError(
            f"the main server ({server.name}) would need {format_bytes(load.memory_bytes)} "
            f"for {len(plans)} clients (one shared base, each client's server-side adapters "
            f"with their AdamW state) but has {format_bytes(server.memory_bytes)}: lower "
            "hetero.server_rank, raise the server's memory, or plan fewer clients")
    return load


def _server_ranks(dims: ModelDims, cut: int, rank: int, tail: int = 0) -> dict[str, int]:
    if rank == 0:
        return {}
    return dict.fromkeys(dims.candidate_modules(range(cut, dims.n_layers - tail)), rank)


def _check_fits(cid: int, profile: DeviceProfile, t: _Table, rates: _Rates,
                s: PlannerSettings, work: Workload) -> None:
    """A PlanError when not even the smallest configuration fits memory and step time."""
    who = f"client {cid} ({profile.name})"
    need = float(t.reserved.min())
    if need > profile.memory_bytes:
        raise PlanError(
            f"{who}: memory budget {format_bytes(profile.memory_bytes)} misses by "
            f"{format_bytes(need - profile.memory_bytes)}: the smallest configuration (cut "
            f"{s.min_cut}, no adapters) needs {format_bytes(need)} of frozen weights and the "
            "hidden state it sends "
            f"(batch {work.batch}, sequence {work.seq}). Give this client more memory in the "
            "scenario, or lower the planner's min_cut."
        )
    if s.time_budget_s is None:
        return
    step0, _ = _fixed(t, rates)
    fastest = float(step0[profile.memory_bytes >= t.reserved].min())
    if fastest > s.time_budget_s:
        raise PlanError(
            f"{who}: step-time budget {s.time_budget_s:.3g} s misses by "
            f"{fastest - s.time_budget_s:.3g} s: the fastest configuration that fits its "
            f"memory, without adapters, takes {fastest:.3g} s per step. Raise time_budget_s, "
            "or shrink batch or sequence length."
        )


def _raise_late(cid: int, profile: DeviceProfile, t: _Table, rates: _Rates,
                s: PlannerSettings, n_clients: int, deadline: float) -> None:
    step0, server = _fixed(t, rates)
    fits = profile.memory_bytes >= t.reserved
    floor = float(np.maximum(s.interval * step0 + _downloads(t, rates),
                             n_clients * s.interval * server)[fits].min())
    raise PlanError(
        f"client {cid} ({profile.name}): round deadline {deadline:.3g} s misses by "
        f"{floor - deadline:.3g} s: its fastest round ({s.interval} steps, the server shared "
        f"by {n_clients} clients) takes {floor:.3g} s. Raise hetero.round_time_s or leave it "
        "null (chosen by the planner)."
    )


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
    over budget, step and round time, utility; the caption has the round time and the
    main server's memory and compute."""
    kinds = list(dict.fromkeys(m.kind for m in dims.candidates))
    server = sorted(set(plan.server_ranks.values()))
    caption = ("ranks: rank×blocks on the client; the server adapts every candidate of "
               "blocks >= cut " + (f"at rank {'/'.join(map(str, server))}" if server else
                                   "with no adapters"))
    if plan.server is not None:
        load = plan.server
        caption += (f". Round {plan.round_seconds:.4g} s; main server "
                    f"{format_bytes(load.memory_bytes)} / {format_bytes(load.budget_bytes)} "
                    f"({load.memory_bytes / load.budget_bytes:.0%}), "
                    f"{load.compute_seconds:.4g} s compute per round")
    table = Table(title="per-client plan", caption=caption)
    for column in ("client", "profile", "cut", *kinds):
        table.add_column(column, justify="right" if column == "cut" else "left")
    for column in ("memory / budget", "step", "round", "utility"):
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
            f"{c.round_seconds:.3g} s",
            "-" if math.isnan(c.utility) else f"{c.utility:.3f}",
        )
    return table
