"""Where role objects live: in this process, or in actors elsewhere (the Ray backend).

The training modes only call role methods. A placement turns a recipe
(:mod:`hsplitlora.train.parties`) into something with the role's methods: the role
itself in process, or a proxy to an actor running it. A proxy answers at once with
:class:`Deferred` values for what it has not computed yet, so the mode's loop goes on
issuing work to the other parties while one computes; the recorder settles deferred
figures at the end of the round.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, Protocol

import torch

__all__ = ["Attendance", "Deferred", "InProcess", "PartyLost", "Placement", "settle",
           "total"]


class PartyLost(RuntimeError):
    """A remote party went away (disconnected, timed out): the run goes on without it."""


class Deferred:
    """A value another party is still computing; :meth:`get` waits for it."""

    def __init__(self, fetch: Callable[[], Any]) -> None:
        self._fetch = fetch
        self._done = False
        self._value: Any = None

    def get(self) -> Any:
        if not self._done:
            self._value, self._done = self._fetch(), True
        return self._value


def settle(value: Any) -> Any:
    """The value itself, waiting for it if it is :class:`Deferred`."""
    return value.get() if isinstance(value, Deferred) else value


def total(*values: int | Deferred) -> int | Deferred:
    """The sum of byte counts, deferred while any of them is."""
    if any(isinstance(v, Deferred) for v in values):
        return Deferred(lambda: sum(settle(v) for v in values))
    return sum(values)  # type: ignore[arg-type]


# The clients present in a round (None: all of them).
Attendance = Callable[[int], Collection[int] | None]


class Recipe(Protocol):
    def build(self, device: torch.device) -> Any: ...


class Placement(Protocol):
    """Builds roles from recipes. ``kind`` is ``"client"``, ``"server"`` or ``"learner"``
    (a backend may give each kind its own resources)."""

    def place(self, recipe: Recipe, kind: str) -> Any: ...

    def watch_base(self, base: torch.nn.Module) -> None:
        """Where the run's base weights live (merges are recorded on them:
        :mod:`hsplitlora.models.shared`): a placement whose parties rebuild their segments
        from their own copy of the base sends what was merged. Placements that ship whole
        segments, or keep them here, ignore it."""

    def started(self) -> None:
        """Return once every placed role is ready to work."""

    def attendance(self, simulated: Attendance) -> Attendance:
        """Each round's clients: the ``simulated`` draw, or, where the clients are real
        remote parties, those actually there."""

    def fed_aggregation(self) -> Any:
        """A heterogeneous run's fed server in another process (a
        :class:`~hsplitlora.train.hetero.FedAggregation`), or None: aggregate here."""

    def close(self, check: bool = True) -> None:
        """Release the roles; ``check`` first re-raises a failure not yet reported."""


class InProcess:
    """Every role in this process, on one device: the simulation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def place(self, recipe: Recipe, kind: str) -> Any:
        return recipe.build(self.device)

    def watch_base(self, base: torch.nn.Module) -> None:
        pass

    def started(self) -> None:
        pass

    def attendance(self, simulated: Attendance) -> Attendance:
        return simulated

    def fed_aggregation(self) -> None:
        return None

    def close(self, check: bool = True) -> None:
        pass
