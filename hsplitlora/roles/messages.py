"""What crosses a role boundary: plain tensors in small dataclasses.

Nothing here references a model, so a transport can serialise these and the receiving
role cannot tell a direct call from a network hop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["Activations", "ServerReply", "nbytes"]


def nbytes(tensors: Mapping[str, torch.Tensor] | list[torch.Tensor] | torch.Tensor) -> int:
    """Payload size of tensors as they would travel (element size x count)."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return sum(t.numel() * t.element_size() for t in values)


@dataclass(frozen=True)
class Activations:
    """A client's upload for one step: the smashed data and what the loss needs.

    Labels travel because the main server computes the loss (as in SplitLoRA), unless
    the client keeps a tail (a U-shaped split: ``labels`` is None and the loss is the
    client's); the attention mask because the server's blocks must mask the same padding.
    """

    hidden: torch.Tensor  # [batch, seq, d_model], output of the client's last block
    attention_mask: torch.Tensor  # [batch, seq], 1 for real tokens
    labels: torch.Tensor | None  # [batch, seq], -100 where no loss is taken; None: kept

    @property
    def nbytes(self) -> int:
        sent = [self.hidden, self.attention_mask]
        return nbytes(sent if self.labels is None else [*sent, self.labels])

    @property
    def grad_nbytes(self) -> int:
        """What the gradient of ``hidden`` costs on its way back (same shape and dtype)."""
        return nbytes(self.hidden)


@dataclass(frozen=True)
class ServerReply:
    """The main server's answer to one upload: the loss and the activation gradient."""

    loss: float
    tokens: int  # target tokens the loss averaged over
    grad: torch.Tensor  # dL/d(hidden), same shape and dtype as the upload

    @property
    def nbytes(self) -> int:
        return nbytes(self.grad)
