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

    def __init__(self, *, weighting: str = "samples", alpha: float = 1.0) -> None:
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        self.weighting = weighting
        self.alpha = alpha
        self.latest: dict[str, torch.Tensor] | None = None
        self.rounds = 0

    def aggregate(self, states: Sequence[Mapping[str, torch.Tensor]],
                  num_samples: Sequence[int]) -> dict[str, torch.Tensor]:
        """FedAvg of flat adapter states, weighted by sample count (or uniformly)."""
        if not states:
            raise ValueError("fed server: nothing to aggregate")
        weights = list(num_samples) if self.weighting == "samples" else [1.0] * len(states)
        pairs = [from_peft_state_dict(s, self.alpha) for s in states]
        self.latest = to_peft_state_dict(fedavg(pairs, weights))
        self.rounds += 1
        return self.latest
