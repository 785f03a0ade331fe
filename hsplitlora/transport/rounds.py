"""Waiting for an aggregation round that the main server opens (a client may upload to
a fed server before the main server has said which clients the round expects)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import TypeVar

__all__ = ["opened_round"]

R = TypeVar("R")


def opened_round(cond: threading.Condition, rounds: Mapping[int, R], round: int,
                 timeout_s: float) -> R:
    """``rounds[round]`` once the main server has opened it, waited for on ``cond``
    (held by the caller) for up to ``timeout_s``: a client may upload before that."""
    deadline = time.monotonic() + timeout_s
    while round not in rounds:
        if not cond.wait(max(0.0, deadline - time.monotonic())):
            raise LookupError(f"aggregation round {round} was never opened by the main "
                              f"server within {timeout_s:g} s")
    return rounds[round]
