"""What every party of a networked run must agree on, and the layouts that follow from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsplitlora.transport.codec import wire_layout
from hsplitlora.transport.validate import Layout, Limit

__all__ = ["Plan", "aggregates_at"]


def aggregates_at(round: int, steps: int, interval: int) -> bool:
    """Whether the fed server aggregates after ``round`` (every ``interval``, and last)."""
    return (round + 1) % interval == 0 or round + 1 == steps


@dataclass(frozen=True)
class Plan:
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

    def aggregates_at(self, round: int) -> bool:
        return aggregates_at(round, self.steps, self.interval)

    def activation_layout(self, codec: str) -> tuple[Layout, dict[str, Limit]]:
        """The tensors a client's upload must hold, with the bounds of its batch."""
        layout = {**wire_layout("hidden", codec, self.dtype, ("B", "S", self.hidden_size)),
                  "attention_mask": ("U8", ("B", "S")), "labels": ("I32", ("B", "S"))}
        limits = {"B": (1, self.batch_size, "train.batch_size"),
                  "S": (1, self.max_length, "data.max_length")}
        return layout, limits
