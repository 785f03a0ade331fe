"""Tensors on the wire: one safetensors blob per message, cut into bounded frames.

safetensors gives every tensor an explicit name, dtype and shape in a JSON header that
can be read, and refused, before a single tensor byte is interpreted; scalars (a loss, a
sample count) ride in its metadata. Frames keep every gRPC message far below protobuf's
2 GB cap, and :class:`Reassembler` refuses a blob as soon as it announces (or grows past)
the size limit, so an oversized upload never sits in memory whole.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hsplitlora.transport import hsplitlora_pb2 as pb

__all__ = ["Blob", "Header", "Reassembler", "WireError", "frames", "pack", "read_header",
           "unpack"]

_MAX_HEADER = 1 << 24  # a header of 16 MB would describe millions of tensors: not ours


class WireError(ValueError):
    """A message broke the wire protocol or a limit; the text says what and which limit."""


def pack(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None) -> bytes:
    """Serialise tensors (and string metadata) to one safetensors blob."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(data, metadata=dict(meta) if meta else None)


@dataclass(frozen=True)
class Header:
    """What a blob claims to hold: ``{name: (safetensors dtype, shape)}`` and metadata."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    meta: dict[str, str] = field(default_factory=dict)


def read_header(blob: bytes) -> Header:
    """Parse a safetensors header without touching tensor data (for validation first)."""
    if len(blob) < 8:
        raise WireError(f"blob of {len(blob)} bytes is too short to be safetensors")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(_MAX_HEADER, len(blob) - 8):
        raise WireError(f"safetensors header claims {size} bytes but the blob holds "
                        f"{len(blob) - 8}")
    try:
        raw = json.loads(blob[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise WireError("safetensors header is not a JSON object")
    meta = raw.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in raw.items():
        try:
            tensors[name] = (str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
        except (KeyError, TypeError, ValueError):
            raise WireError(f"safetensors header entry {name!r} lacks a dtype or shape") from None
    return Header(tensors, {str(k): str(v) for k, v in meta.items()})


def unpack(blob: bytes) -> dict[str, torch.Tensor]:
    """Deserialise a blob (after :func:`read_header` and validation)."""
    try:
        return st_load(blob)
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise WireError(f"corrupt safetensors blob: {e}") from None


def frames(blob: bytes, kind: str, round: int, seq: int, chunk_bytes: int) -> Iterator[pb.Chunk]:
    """Cut a blob into chunks of at most ``chunk_bytes``."""
    count = max(1, -(-len(blob) // chunk_bytes))
    view = memoryview(blob)
    for i in range(count):
        yield pb.Chunk(seq=seq, kind=kind, round=round, total_bytes=len(blob), index=i,
                       last=i == count - 1, data=bytes(view[i * chunk_bytes:(i + 1) * chunk_bytes]))


@dataclass(frozen=True)
class Blob:
    kind: str
    round: int
    data: bytes


class Reassembler:
    """Joins the chunks of one stream back into blobs, enforcing the size limit early.

    A blob that breaks a rule raises :class:`WireError` once; its remaining chunks are
    then skipped silently, so the stream stays usable for the next message.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._seq: int | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._head: pb.Chunk | None = None
        self._refused: int | None = None

    def feed(self, chunk: pb.Chunk) -> Blob | None:
        if chunk.seq == self._refused:
            return None
        try:
            return self._feed(chunk)
        except WireError:
            self._refused = chunk.seq
            self._reset()
            raise

    def _feed(self, chunk: pb.Chunk) -> Blob | None:
        if self._head is None:
            if chunk.index != 0:
                raise WireError(f"{chunk.kind} blob {chunk.seq} starts at chunk {chunk.index}, "
                                "not 0")
            if chunk.total_bytes > self.max_bytes:
                raise WireError(f"{chunk.kind!r} blob of {chunk.total_bytes} bytes exceeds the "
                                f"limit of {self.max_bytes} bytes (net.max_tensor_mb)")
            self._head, self._seq = chunk, chunk.seq
        elif chunk.seq != self._seq or chunk.index != len(self._parts):
            raise WireError(f"chunk {chunk.index} of blob {chunk.seq} arrived while blob "
                            f"{self._seq} expected chunk {len(self._parts)}")
        self._size += len(chunk.data)
        if self._size > self._head.total_bytes:
            raise WireError(f"{chunk.kind} blob {chunk.seq} grew past its announced "
                            f"{self._head.total_bytes} bytes")
        self._parts.append(chunk.data)
        if not chunk.last:
            return None
        if self._size != self._head.total_bytes:
            raise WireError(f"{chunk.kind} blob {chunk.seq} ended at {self._size} of "
                            f"{self._head.total_bytes} announced bytes")
        blob = Blob(self._head.kind, self._head.round, b"".join(self._parts))
        self._reset()
        return blob

    def _reset(self) -> None:
        self._head, self._seq, self._parts, self._size = None, None, [], 0
