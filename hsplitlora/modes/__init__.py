"""The training modes, one small module each: what a mode *is*, as data the engine reads.

Each module in this package declares one :class:`Mode`: its schedule, whether a main
server runs the blocks past the cut and whether that server side is one shared adapter or
one per participant, how adapters are aggregated, whether clients get heterogeneous
plans, which placements can run it. Nothing else in the package compares mode names:
adding a baseline is one new module here (listed in ``_MODULES``) plus its tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

__all__ = ["MERGING", "MODES", "SHARED_SIDE", "Mode", "mode_names", "mode_of"]

Schedule = Literal["centralized", "relay", "parallel"]
# The aggregators that merge each aggregation's exact update into the base and restart the
# adapters (HSplitLoRA's noise-free aggregation, FLoRA's stacking); the others hand each
# participant adapters back.
MERGING = frozenset({"noisefree", "stack"})
# The aggregators a shared server side can take part in: the merging ones, and those that
# hand back a per-matrix truncation of a global model (HetLoRA's zero-padding, FlexLoRA's
# SVD), which the shared side takes like any participant of the blocks it serves. Not
# FedAvg: it averages factors of one rank, and a shared side holds the largest rank.
SHARED_SIDE = MERGING | {"zeropad", "svd"}
ServerSide = Literal["none", "shared", "per_participant"]


@dataclass(frozen=True)
class Mode:
    """The facts of one training mode (see docs/engine.md for what each one changes)."""

    name: str
    summary: str  # one line: who holds what
    # centralized: one party, all data; relay: clients take turns (vanilla split
    # learning); parallel: every present client trains each round
    schedule: Schedule
    # shared: one server-side adapter updated on every client's batch (SplitLoRA, SFL-V2);
    # per_participant: one per client, aggregated like the client side (SFL-V1 and the
    # heterogeneous modes); none: no main server (the client holds the whole model)
    server: ServerSide
    # the aggregation method; None: the run's ``hetero.aggregator`` (HSplitLoRA's ablation)
    aggregator: str | None = "fedavg"
    planned: bool = False  # per-client cut and ranks from the heterogeneous planner
    importance: bool = False  # IWI may place the adapters (``hetero.importance``)
    adaptive: bool = False  # ARMSC may choose cuts and ranks (``hetero.adaptive``)
    unsplit_variant: bool = False  # ``hetero.federated``: clients hold the whole model
    # on heterogeneous devices, one rank for all: the largest the weakest client fits
    weakest_rank: bool = False
    # HetLoRA's rank self-pruning at each aggregation (``hetero.prune_gamma`` / ``_threshold``)
    self_pruning: bool = False
    trains: tuple[str, ...] = ("A", "B")  # the LoRA factors trained (and aggregated)
    placements: frozenset[str] = frozenset({"inprocess", "ray", "grpc"})
    color: str = "Greys"  # matplotlib colormap of its bars and curves in experiment plots

    @property
    def split(self) -> bool:
        """Whether a main server runs the blocks past each client's cut."""
        return self.server != "none"

    @property
    def learners(self) -> bool:
        """Whether each party trains the unsplit model itself (the Learner role)."""
        return not self.split and not self.planned

    def rounds(self, steps: int, num_clients: int, interval: int) -> int:
        """Rounds of a run of ``steps`` local steps per client: one step of every client
        (parallel), one step (centralized: it sees the data of every client), one turn
        of ``interval`` steps (relay)."""
        if self.schedule == "centralized":
            return steps * num_clients
        if self.schedule == "relay":
            return num_clients * -(-steps // interval)
        return steps

    def eval_rounds(self, every: int, interval: int, num_clients: int) -> int:
        """``every`` aggregations, in this mode's rounds."""
        if self.schedule == "centralized":
            return every * interval * num_clients
        if self.schedule == "relay":
            return every  # one round per hand-off
        return every * interval

    def checkpoint_every(self, num_clients: int) -> int:
        """Rounds between checkpoints: the data of one round of the parallel modes."""
        return num_clients if self.schedule == "centralized" else 1

    def server_steps(self, steps: int, num_clients: int) -> int:
        """Optimizer steps of one server-side adapter: a shared one steps on every
        client's batch."""
        return steps * num_clients if self.server == "shared" else steps

    def parties(self, num_clients: int) -> int:
        """Role objects a run places (Ray actors): clients plus a main server."""
        if self.schedule == "centralized":
            return 1
        return num_clients + (1 if self.split else 0)


_MODULES = ("centralized", "federated", "split", "splitfed", "splitlora", "hsplitlora",
            "hetlora", "flexlora", "flora", "ffalora")

MODES: dict[str, Mode] = {}
for _name in _MODULES:
    _mode = importlib.import_module(f"{__name__}.{_name}").MODE
    if _mode.name != _name:
        raise ImportError(f"hsplitlora/modes/{_name}.py declares mode {_mode.name!r}")
    MODES[_name] = _mode


def mode_names() -> tuple[str, ...]:
    return tuple(MODES)


def mode_of(name: str) -> Mode:
    """The mode called ``name``, or an error listing the modes there are."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown training mode {name!r}; the modes are "
                         f"{', '.join(MODES)}") from None
