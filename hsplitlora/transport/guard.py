"""Undo a main-server step whose outcome is not finite, so no upload can poison the run.

Validation bounds what arrives; this is the second line: after the step the loss, the
gradient going back and the updated adapter must be finite (and the gradient within the
run's value bound), or the server goes back to its state before the step (adapters,
optimizer, RNG: the same state a checkpoint holds, so the undo is exact) and the upload
is refused. Nothing non-finite then ever reaches a checkpoint or another client.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from hsplitlora.roles.messages import Activations, ServerReply
from hsplitlora.transport.validate import check_finite, check_magnitude
from hsplitlora.transport.wire import WireError

__all__ = ["guarded_step"]


class _Server(Protocol):
    def step(self, client_id: int, acts: Activations) -> ServerReply: ...
    def forward(self, client_id: int, acts: Activations) -> torch.Tensor: ...
    def backward(self, client_id: int, grad: torch.Tensor) -> torch.Tensor: ...
    def adapter_state(self, client_id: int | None = None) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Any) -> None: ...


# A U-shaped client's answer to the server's activations: its loss, tokens and gradient.
Tail = Callable[[torch.Tensor], ServerReply]


def guarded_step(server: _Server, client_id: int, acts: Activations, bound: float,
                 what: str, tail: Tail | None = None) -> ServerReply:
    """``server.step`` that either succeeds with finite results or changes nothing and
    raises :class:`WireError` saying what went wrong. With ``tail`` (a U-shaped split)
    the step is the server's two hops around the client's tail: whatever fails on the
    way (the client's answer included) undoes it."""
    before = server.state_dict()  # deep copies: later steps cannot alter them
    try:
        if tail is None:
            reply = server.step(client_id, acts)
            grad = reply.grad
        else:
            returned = server.forward(client_id, acts)
            check_finite({"returned": returned}, what)
            reply = tail(returned)
            grad = server.backward(client_id, reply.grad)
        if not math.isfinite(reply.loss):
            raise WireError(f"{what}: the server's loss on it is {reply.loss}")
        check_finite({"grad": grad}, what)
        check_magnitude({"grad": grad}, bound, what)
        check_finite(server.adapter_state(client_id), f"{what}: the updated server adapter")
    except (WireError, FloatingPointError, RuntimeError, ValueError, OverflowError) as e:
        server.load_state_dict(before)
        if isinstance(e, WireError):
            raise WireError(f"{e}; the step was undone") from None
        raise WireError(f"{what}: the server step failed on it ({type(e).__name__}: {e}); "
                        "the step was undone") from None
    except BaseException:
        server.load_state_dict(before)
        raise
    return ServerReply(reply.loss, reply.tokens, grad)
