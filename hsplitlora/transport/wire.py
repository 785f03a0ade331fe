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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hsplitlora.transport import hsplitlora_pb2 as pb

__all__ = ["Blob", "Header", "Reassembler", "WireError", "frames", "pack", "read_header",
           "unpack"]

_MAX_HEADER = 1 << 24  # a header of 16 MB would describe millions of tensors: not ours
_MAX_DIMS = 8  # activations have 3 dimensions and adapters 2; more is not a tensor of ours
# bytes per element of every safetensors dtype
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


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
    """Parse and check a safetensors header without touching tensor data.

    Everything a peer could get wrong is refused here as a :class:`WireError`: JSON that is
    too deep or holds numbers no shape can have, metadata that is not strings, unknown
    dtypes, and offsets that do not tile the data exactly. Nothing past this point (the
    layout check, safetensors, torch) ever sees a header it could choke on.
    """
    if len(blob) < 8:
        raise WireError(f"blob of {len(blob)} bytes is too short to be safetensors")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(_MAX_HEADER, len(blob) - 8):
        raise WireError(f"safetensors header claims {size} bytes but the blob holds "
                        f"{len(blob) - 8}")
    try:
        raw = json.loads(blob[8 : 8 + size])
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, or a 5000-digit number
        raise WireError(f"safetensors header is not valid JSON: {e}") from None
    except RecursionError:
        raise WireError("safetensors header nests deeper than any header can") from None
    if not isinstance(raw, dict):
        raise WireError("safetensors header is not a JSON object")
    meta = raw.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WireError("safetensors __metadata__ must map strings to strings")
    data_bytes = len(blob) - 8 - size
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in raw.items():
        dtype, shape, span = _entry(name, entry, data_bytes)
        tensors[name] = (dtype, shape)
        spans.append((*span, name))
    _check_tiling(spans, data_bytes)
    return Header(tensors, dict(meta))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, entry: object,
           data_bytes: int) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """One tensor's dtype, shape and byte span, each checked against the data it claims."""
    if not isinstance(entry, dict):
        raise WireError(f"safetensors header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype is None or shape is None:
        raise WireError(f"safetensors header entry {name!r} lacks a dtype or shape")
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise WireError(f"safetensors header entry {name!r} has dtype {dtype!r}; expected one "
                        f"of {', '.join(_ITEMSIZE)}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
            and all(_is_int(d) and 0 <= d <= data_bytes for d in shape)):
        raise WireError(f"safetensors header entry {name!r} lacks a shape of at most "
                        f"{_MAX_DIMS} non-negative integers no larger than the data")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise WireError(f"safetensors header entry {name!r} has data_offsets {offsets!r} "
                        f"outside the {data_bytes} bytes of data")
    numel = 1
    for d in shape:
        numel *= d
        if numel * _ITEMSIZE[dtype] > data_bytes:
            break  # the product only grows: refused below, without a huge multiplication
    if numel * _ITEMSIZE[dtype] != offsets[1] - offsets[0]:
        raise WireError(f"safetensors header entry {name!r}: shape {tuple(shape)} of "
                        f"{dtype} does not fill its {offsets[1] - offsets[0]} bytes")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _check_tiling(spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors' byte spans must cover the data exactly, without gaps or overlaps."""
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise WireError(f"safetensors tensor {name!r} starts at byte {begin}, expected "
                            f"{at}: tensors overlap or leave a gap")
        at = end
    if at != data_bytes:
        raise WireError(f"safetensors tensors cover {at} bytes of the {data_bytes} that "
                        "follow the header")


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
    ``max_bytes`` may be a function, asked as each blob starts: a stream can open before
    the receiver knows the run's sizes (the heterogeneous hub loads its model meanwhile).
    """

    def __init__(self, max_bytes: int | Callable[[], int]) -> None:
        self._limit = max_bytes
        self._seq: int | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._head: pb.Chunk | None = None
        self._refused: int | None = None

    @property
    def max_bytes(self) -> int:
        return self._limit() if callable(self._limit) else self._limit

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
            limit = self.max_bytes
            if chunk.total_bytes > limit:
                raise WireError(f"{chunk.kind!r} blob of {chunk.total_bytes} bytes exceeds the "
                                f"limit of {limit} bytes (net.max_tensor_mb)")
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
