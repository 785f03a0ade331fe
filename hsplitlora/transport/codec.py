"""Wire formats for activations and gradients: exact, half precision, or int8.

Pure functions, tensors in and tensors out. ``none`` is lossless: a networked run with it
is bit-identical to the in-process one. ``bf16``/``fp16`` halve the bytes; ``int8`` keeps
one fp32 scale per channel (the last dimension, where transformer activations carry their
outliers) and quarters them. Masks travel as uint8 and labels as int32 under every codec:
both are small integers, so this is lossless and keeps the bookkeeping tensors from eating
the savings of the compressed ones. A U-shaped client sends no labels at all.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hsplitlora.roles.messages import Activations

__all__ = ["CODECS", "ST_DTYPES", "decode", "decode_activations", "encode",
           "encode_activations", "wire_layout"]

CODECS = ("none", "bf16", "fp16", "int8")

# safetensors' names for the dtypes that may cross the wire
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64",
}

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _check(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def encode(name: str, x: torch.Tensor, codec: str) -> dict[str, torch.Tensor]:
    """The wire tensors for one float tensor ``x`` travelling as ``name``."""
    _check(codec)
    if codec == "none":
        return {name: x}
    if codec in _HALF:
        return {name: x.to(_HALF[codec])}
    flat = x.float().reshape(-1, x.shape[-1])
    amax = flat.abs().amax(dim=0)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(flat / scale).clamp_(-127, 127).to(torch.int8)
    return {name: q.reshape(x.shape), f"{name}.scale": scale}


def decode(wire: Mapping[str, torch.Tensor], name: str, codec: str,
           dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`encode`, cast to the receiver's ``dtype``."""
    _check(codec)
    x = wire[name]
    if codec == "int8":
        x = x.float() * wire[f"{name}.scale"]
    return x.to(dtype)


def wire_layout(name: str, codec: str, dtype: torch.dtype,
                shape: tuple[int | str, ...]) -> dict[str, tuple[str, tuple[int | str, ...]]]:
    """What :func:`encode` sends for a ``dtype`` tensor of ``shape``: ``{name: (safetensors
    dtype, shape)}``; symbolic dimensions stay symbolic, for validation."""
    _check(codec)
    if codec == "none":
        return {name: (ST_DTYPES[dtype], shape)}
    if codec in _HALF:
        return {name: (ST_DTYPES[_HALF[codec]], shape)}
    return {name: ("I8", shape), f"{name}.scale": ("F32", shape[-1:])}


def encode_activations(acts: Activations, codec: str) -> dict[str, torch.Tensor]:
    """The wire tensors of an upload; a U-shaped client's has no labels."""
    labels = {} if acts.labels is None else {"labels": acts.labels.to(torch.int32)}
    return {**encode("hidden", acts.hidden, codec),
            "attention_mask": acts.attention_mask.to(torch.uint8), **labels}


def decode_activations(wire: Mapping[str, torch.Tensor], codec: str,
                       dtype: torch.dtype) -> Activations:
    labels = wire["labels"].to(torch.int64) if "labels" in wire else None
    return Activations(decode(wire, "hidden", codec, dtype),
                       wire["attention_mask"].to(torch.int64), labels)
