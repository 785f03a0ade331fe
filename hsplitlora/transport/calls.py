"""The call protocol of the heterogeneous modes: client methods as blobs on the stream.

In HSplitLoRA and its baselines the main server plans every client (cut and ranks),
probes importance through the clients and aggregates participants that span both sides,
so it runs the training loop itself and drives each client like a role object: a "call"
blob names a :class:`~hsplitlora.roles.client.Client` method, carries its tensors and
JSON arguments, and the methods that return something are answered with a "reply". Pure
functions here turn the arguments into bytes and back, checking what arrives.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from hsplitlora.hetero.importance import module_of
from hsplitlora.models.lora import LoraSettings
from hsplitlora.roles.client import Update
from hsplitlora.transport.wire import Header, WireError, pack, read_header, unpack

__all__ = ["Call", "pack_call", "pack_updates", "read_call", "read_scores",
           "settings_from_json", "settings_to_json", "unpack_updates"]

_FACTORS = (".U", ".V")


class Call:
    """One decoded call: the method, its JSON arguments, its tensors and the header that
    describes them (for checking them against what the method expects)."""

    def __init__(self, method: str, args: dict[str, Any], tensors: dict[str, torch.Tensor],
                 header: Header) -> None:
        self.method = method
        self.args = args
        self.tensors = tensors
        self.header = header


def pack_call(method: str, args: Mapping[str, Any] | None = None,
              tensors: Mapping[str, torch.Tensor] | None = None) -> bytes:
    return pack(tensors or {}, {"method": method, "args": json.dumps(dict(args or {}))})


def read_call(data: bytes) -> Call:
    header = read_header(data)
    method = header.meta.get("method", "")
    try:
        args = json.loads(header.meta.get("args", "{}"))
    except json.JSONDecodeError as e:
        raise WireError(f"call {method!r}: arguments are not JSON: {e}") from None
    if not method or not isinstance(args, dict):
        raise WireError("a call must name a method and carry a JSON object of arguments")
    return Call(method, args, unpack(data), header)


def settings_to_json(s: LoraSettings) -> dict[str, Any]:
    """Everything a party needs to attach exactly these adapters (seed included)."""
    return {"r": s.r, "alpha": s.alpha, "dropout": s.dropout,
            "targets": list(s.targets) if s.targets is not None else None,
            "ranks": dict(s.ranks), "alphas": dict(s.alphas), "init_seed": s.init_seed}


def settings_from_json(d: Mapping[str, Any]) -> LoraSettings:
    try:
        targets = d["targets"]
        return LoraSettings(
            r=int(d["r"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
            targets=tuple(str(t) for t in targets) if targets is not None else None,
            ranks={str(k): int(v) for k, v in d["ranks"].items()},
            alphas={str(k): float(v) for k, v in d["alphas"].items()},
            init_seed=None if d["init_seed"] is None else int(d["init_seed"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise WireError(f"LoRA settings in a call are malformed ({e!r}); server and client "
                        "must run the same hsplitlora version") from None


def pack_updates(updates: Mapping[str, Update]) -> dict[str, torch.Tensor]:
    """Aggregated updates as tensors: dense ``{module}`` or factors ``{module}.U/.V``."""
    out: dict[str, torch.Tensor] = {}
    for module, u in updates.items():
        if isinstance(u, torch.Tensor):
            out[module] = u
        else:
            out[f"{module}.U"], out[f"{module}.V"] = u
    return out


def unpack_updates(tensors: Mapping[str, torch.Tensor],
                   shapes: Mapping[str, tuple[int, int]], what: str) -> dict[str, Update]:
    """Inverse of :func:`pack_updates`, checked against ``shapes`` (module -> (d_out,
    d_in) of its weight update): unknown modules, wrong shapes and non-finite values are
    refused."""
    out: dict[str, Update] = {}
    for name, t in tensors.items():
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise WireError(f"{what}: {name!r} is not a finite float tensor")
        module = name[:-2] if name.endswith(_FACTORS) else name
        if module not in shapes:
            raise WireError(f"{what}: update for {module!r}, which this client does not hold")
        d_out, d_in = shapes[module]
        if name == module:
            if tuple(t.shape) != (d_out, d_in):
                raise WireError(f"{what}: {name!r} has shape {tuple(t.shape)}, expected "
                                f"{(d_out, d_in)}")
            out[module] = t
            continue
        if module in out:
            continue
        u, v = tensors.get(f"{module}.U"), tensors.get(f"{module}.V")
        if u is None or v is None or u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0] \
                or (u.shape[0], v.shape[1]) != (d_out, d_in):
            raise WireError(f"{what}: factors of {module!r} must be U [{d_out}, r] and "
                            f"V [r, {d_in}]")
        out[module] = (u, v)
    return out


def read_scores(meta: Mapping[str, str], allowed: set[str], what: str) -> dict[str, float]:
    """A client's importance map: finite, non-negative, about modules it holds."""
    try:
        raw = json.loads(meta.get("scores", ""))
    except json.JSONDecodeError:
        raise WireError(f"{what}: no JSON scores in the reply") from None
    if not isinstance(raw, dict):
        raise WireError(f"{what}: scores must be a JSON object")
    out: dict[str, float] = {}
    for name, value in raw.items():
        if module_of(name) not in allowed:
            raise WireError(f"{what}: a score for {name!r}, which this client does not hold")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise WireError(f"{what}: the score of {name!r} must be a finite number >= 0")
        out[name] = float(value)
    return out
