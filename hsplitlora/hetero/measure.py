"""Measure what the cost model predicts: matmul FLOPs and bytes kept for backward.

One implementation for the tests that check the cost model and the bench that prints it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["counted_flops", "saved_bytes"]

T = TypeVar("T")


def saved_bytes(fn: Callable[[], T], params: Iterable[torch.Tensor]) -> tuple[int, T]:
    """Bytes autograd keeps for backward while ``fn`` runs: unique storages, no parameters."""
    own = {p.untyped_storage().data_ptr() for p in params}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(kept.values()), out


def counted_flops(fn: Callable[[], T]) -> tuple[int, T]:
    """Matmul FLOPs of ``fn`` as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), out
