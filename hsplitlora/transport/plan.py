"""What every party of a networked run must agree on, and the layouts that follow from it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from hsplitlora.models.lora import LoraSettings, adapter_shapes
from hsplitlora.models.structure import ArchSpec
from hsplitlora.transport.codec import wire_layout
from hsplitlora.transport.validate import Layout, Limit

__all__ = ["WirePlan", "aggregates_at", "layout_bytes", "samples_problem", "value_bound"]


def aggregates_at(round: int, steps: int, interval: int) -> bool:
    """Whether the fed server aggregates after ``round`` (every ``interval``, and last)."""
    return (round + 1) % interval == 0 or round + 1 == steps


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "F64": 8}
_HEADER_ROOM = 1 << 16  # safetensors header and metadata of any blob of ours


def layout_bytes(layout: Layout, dims: dict[str, int] | None = None) -> int:
    """Bytes of a blob holding ``layout`` with symbolic dimensions at ``dims``, plus room
    for its header: the size limit a receiver can derive instead of a fixed one."""
    total = _HEADER_ROOM
    for dtype, shape in layout.values():
        n = _ITEMSIZE.get(dtype, 8)
        for d in shape:
            n *= d if isinstance(d, int) else (dims or {})[d]
        total += n
    return total


def widest_adapter_bytes(shapes: Mapping[str, tuple[int, int]], spec: ArchSpec,
                         ranks: Iterable[int]) -> int:
    """Blob bytes of the largest adapter a heterogeneous client may upload: every matrix
    it could hold at the largest rank a plan may give, since re-plans move cuts and ranks
    (what the hub and the fed server derive their default upload limits from)."""
    widest = LoraSettings(r=max(ranks), targets=spec.targets)
    return layout_bytes({k: ("F32", shape) for k, shape in adapter_shapes(
        shapes, widest, spec.default_targets).items()})


def value_bound(hidden_size: int, configured: float | None) -> float:
    """The largest ``|value|`` an activation, gradient or adapter may carry:
    ``net.max_activation``, or by default the bound under which the sum of squares of one
    hidden vector (what every norm layer computes, in fp32) stays finite with a 256x
    margin. Real residual streams and adapters sit many orders below it; an attacker's
    3e38 sits far above."""
    if configured is not None:
        return configured
    return math.sqrt(torch.finfo(torch.float32).max / max(hidden_size, 1)) / 16


def samples_problem(samples: tuple[int, ...], client_id: int, claimed: int) -> str | None:
    """Why ``claimed`` cannot be client ``client_id``'s sample count, given every client's
    shard size (None: it can; an empty ``samples`` checks only that it is positive)."""
    if claimed < 1:
        return "num_samples must be positive"
    if not samples or not 0 <= client_id < len(samples):
        return None
    expected = samples[client_id]
    if claimed != expected:
        return (f"client {client_id} claims {claimed} samples but its shard of this run "
                f"holds {expected}; use the same config (data section) on both sides")
    return None


@dataclass(frozen=True)
class WirePlan:
    """The run as the wire sees it: what every message of a networked run must fit (the
    mode and schedule, the cut, shapes and dtype of activations, shard sizes, a tail),
    fixed by the server and checked against each hello and upload."""

    mode: str
    steps: int
    interval: int
    cut: int
    num_clients: int
    batch_size: int
    max_length: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype  # of the activations the clients' segments produce
    samples: tuple[int, ...] = ()  # each client's shard size (empty: not known here)
    tail: int = 0  # blocks each client keeps at the end (U-shaped split: no labels travel)

    def aggregates_at(self, round: int) -> bool:
        return aggregates_at(round, self.steps, self.interval)

    def value_bound(self, configured: float | None) -> float:
        return value_bound(self.hidden_size, configured)

    def samples_problem(self, client_id: int, claimed: int) -> str | None:
        return samples_problem(self.samples, client_id, claimed)

    def upload_bytes(self, codec: str) -> int:
        """The largest upload of this run: one full batch of activations, with room for its
        header."""
        layout, limits = self.activation_layout(codec)
        return layout_bytes(layout, {k: high for k, (_, high, _) in limits.items()})

    def activation_layout(self, codec: str) -> tuple[Layout, dict[str, Limit]]:
        """The tensors a client's upload must hold, with the bounds of its batch (a
        U-shaped client's holds no labels: they would be refused)."""
        labels: Layout = {} if self.tail else {"labels": ("I32", ("B", "S"))}
        layout = {**wire_layout("hidden", codec, self.dtype, ("B", "S", self.hidden_size)),
                  "attention_mask": ("U8", ("B", "S")), **labels}
        limits = {"B": (1, self.batch_size, "train.batch_size"),
                  "S": (1, self.max_length, "data.max_length")}
        return layout, limits
