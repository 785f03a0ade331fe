"""The Gaussian mechanism on what a client sends: per-example clipping of the smashed
activations, per-client clipping of the adapter update, noise scaled to the bound.

Pure tensor functions and one holder of a seeded generator per channel; the client
role calls them at the one place each tensor leaves it, so in-process, Ray and gRPC runs
send the very same noised tensors (docs/privacy.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["Gaussian", "clip_examples", "clip_update"]


def clip_examples(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale each example (dim 0) whose L2 norm over all its other dims exceeds
    ``bound`` down to norm ``bound``; the others pass unchanged. Differentiable: the
    client back-propagates through the scaling it applied."""
    norms = x.detach().flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (bound / norms).clamp(max=1.0)
    return x * scale.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def clip_update(update: Mapping[str, torch.Tensor], bound: float) -> dict[str, torch.Tensor]:
    """Scale a whole update (all its tensors as one vector) to L2 norm at most ``bound``."""
    norm = torch.stack([t.double().norm() for t in update.values()]).norm().item()
    scale = min(1.0, bound / max(norm, 1e-12))
    return {k: t * scale for k, t in update.items()}


@dataclass
class Gaussian:
    """One release channel of a client: clip to ``clip``, add N(0, (noise clip)^2).

    The noise comes from the channel's own seeded CPU generator, so a run draws the
    same noise on any device and placement, and a checkpoint can carry its position.
    To autograd the noise is a constant: the server's gradient w.r.t. the noised
    tensor flows back through the clipping into the client's blocks."""

    clip: float
    noise: float
    seed: int
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(like.shape, generator=self.generator)
        return (self.noise * self.clip) * eps.to(like.device, like.dtype)

    def activations(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each example's activation tensor clipped and noised (same dtype out)."""
        out = clip_examples(hidden.float(), self.clip)
        if self.noise > 0:
            out = out + self._noise(out)
        return out.to(hidden.dtype)

    def update(self, update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A whole adapter update clipped as one vector, and noised."""
        out = clip_update(update, self.clip)
        if self.noise > 0:
            out = {k: t + self._noise(t) for k, t in out.items()}
        return out
