"""What a training party (a client or a learner) saves for a resume, and loads back.

One shape for both: adapters, optimizer (with its LR schedule's position), the position
of each named batch stream and the process's RNG (dropout), so a restored party draws
and computes exactly what it would have.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch

from hsplitlora.runtime.batches import stream_state
from hsplitlora.runtime.optim import Optimizer

__all__ = ["load_party_state", "party_state"]


class _Party(Protocol):
    optimizer: Optimizer

    def adapter_state(self) -> dict[str, torch.Tensor]: ...

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None: ...


def party_state(party: _Party, streams: Mapping[str, Iterator[Any] | None]) -> dict[str, Any]:
    """The party's state, with each of ``streams``' position under its name."""
    return {"adapter": party.adapter_state(),
            "optimizer": copy.deepcopy(party.optimizer.state_dict()),
            **{name: stream_state(stream) for name, stream in streams.items()},
            "rng": torch.get_rng_state()}


def load_party_state(party: _Party, state: Mapping[str, Any],
                     streams: Mapping[str, Iterator[Any] | None]) -> None:
    """Continue from :func:`party_state`; a stream saved without a position is left be."""
    party.load_adapter_state(state["adapter"])
    party.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
    for name, stream in streams.items():
        if state[name] is not None:
            stream.load_state_dict(state[name])  # type: ignore[union-attr]
    torch.set_rng_state(state["rng"])
