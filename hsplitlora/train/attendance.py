"""Which clients take part in each round, drawn from their devices' availability.

Real federated populations are not all there all the time: a phone is off, on a metered
link, or busy. Each client's profile carries an ``availability`` (the probability of
taking part in a round); a round's attendance is drawn from it, independently per client
and round, from a seed of (run, round), so every mode and backend sees the same rounds.
A client that misses a round trains nothing in it; the next aggregation averages over the
clients that trained since the previous one (their weights renormalised over them, as
when a networked client drops out) and every client then continues from the aggregate.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["present"]


def present(availability: Sequence[float], seed: int, round: int) -> list[int]:
    """Ids of the clients present in ``round`` (all of them where availability is 1)."""
    rng = random.Random(seed * 1_000_003 + round)
    return [cid for cid, p in enumerate(availability) if p >= 1 or rng.random() < p]
