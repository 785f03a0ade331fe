"""The fed server role: it holds nothing but the latest aggregate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hsplitlora.aggregate import fedavg, from_peft_state_dict, to_peft_state_dict

__all__ = ["FedServer"]


class FedServer:
    """Aggregates client-side adapters every ``I`` local steps (SplitLoRA: FedAvg).

    It never sees activations, data or the server-side model, which is why it can run in
    its own process (or on its own machine) apart from the main server.
    """

    def __init__(self, *, weighting: str = "samples", alpha: float = 1.0,
                 parts: tuple[str, ...] = ("A", "B")) -> None:
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        self.weighting = weighting
        self.alpha = alpha
        self.parts = parts  # the LoRA factors clients train (FFA-LoRA: only B)
        self.latest: dict[str, torch.Tensor] | None = None
        self.rounds = 0

    def aggregate(self, states: Sequence[Mapping[str, torch.Tensor]],
                  num_samples: Sequence[int]) -> dict[str, torch.Tensor]:
        """FedAvg of flat adapter states, weighted by sample count (or uniformly). A
        factor nobody trains is the same in every state (its common initialisation) and
        is passed through as it is."""
        if not states:
            raise ValueError("fed server: nothing to aggregate")
        weights = list(num_samples) if self.weighting == "samples" else [1.0] * len(states)
        pairs = [from_peft_state_dict(s, self.alpha) for s in states]
        merged = to_peft_state_dict(fedavg(pairs, weights))
        for key, value in states[0].items():
            if not self.trained(key):
                if any(not torch.equal(s[key], value) for s in states[1:]):
                    raise ValueError(f"fed server: {key} is frozen, yet the clients' copies "
                                     "differ: they must share one initialisation")
                merged[key] = value
        self.latest = merged
        self.rounds += 1
        return self.latest

    def trained(self, key: str) -> bool:
        """Whether adapter tensor ``key`` is trained (so uploaded and averaged)."""
        return any(f".lora_{part}." in key for part in self.parts)

    def uploaded(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What of a client's adapter state travels to aggregation: its trained factors."""
        return {k: v for k, v in state.items() if self.trained(k)}
