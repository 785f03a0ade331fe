"""Undo a main-server step whose outcome is not finite, so no upload can poison the run.

Validation bounds what arrives; this is the second line: after the step the loss, the
gradient going back and the updated adapter must be finite (and the gradient within the
run's value bound), or the server goes back to its state before the step (adapters,
optimizer, RNG: the same state a checkpoint holds, so the undo is exact) and the upload
is refused. Nothing non-finite then ever reaches a checkpoint or another client.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from hsplitlora.roles.messages import Activations, ServerReply
from hsplitlora.transport.validate import check_finite, check_magnitude
from hsplitlora.transport.wire import WireError

__all__ = ["guarded_step"]


class _Server(Protocol):
    def step(self, client_id: int, acts: Activations) -> ServerReply: ...
    def adapter_state(self, client_id: int | None = None) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Any) -> None: ...


def guarded_step(server: _Server, client_id: int, acts: Activations, bound: float,
                 what: str) -> ServerReply:
    """``server.step`` that either succeeds with finite results or changes nothing and
    raises :class:`WireError` saying what went wrong."""
    before = server.state_dict()  # deep copies: later steps cannot alter them
    try:
        reply = server.step(client_id, acts)
        if not math.isfinite(reply.loss):
            raise WireError(f"{what}: the server's loss on it is {reply.loss}")
        check_finite({"grad": reply.grad}, what)
        check_magnitude({"grad": reply.grad}, bound, what)
        check_finite(server.adapter_state(client_id), f"{what}: the updated server adapter")
    except (WireError, FloatingPointError, RuntimeError, ValueError, OverflowError) as e:
        server.load_state_dict(before)
        if isinstance(e, WireError):
            raise WireError(f"{e}; the step was undone") from None
        raise WireError(f"{what}: the server step failed on it ({type(e).__name__}: {e}); "
                        "the step was undone") from None
    return reply
