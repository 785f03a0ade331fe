"""Safetensors blobs in bounded frames: round trips, early refusal, stream recovery."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.transport.wire import Reassembler, WireError, frames, pack, read_header, unpack


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"hidden": torch.randn(2, 5, 8, generator=g),
            "labels": torch.randint(-100, 50, (2, 5), dtype=torch.int32, generator=g)}


def test_a_blob_round_trips_through_frames_bit_for_bit():
    tensors = _tensors()
    blob = pack(tensors, {"loss": repr(0.1 + 0.2)})
    chunks = list(frames(blob, "acts", 7, 3, chunk_bytes=64))
    assert len(chunks) == -(-len(blob) // 64) > 1
    assert all(len(c.data) <= 64 for c in chunks) and [c.last for c in chunks][-2:] == [False, True]
    assembler = Reassembler(max_bytes=1 << 20)
    out = [assembler.feed(c) for c in chunks]
    assert out[:-1] == [None] * (len(chunks) - 1)
    got = out[-1]
    assert (got.kind, got.round, got.data) == ("acts", 7, blob)
    header = read_header(got.data)
    assert header.tensors == {"hidden": ("F32", (2, 5, 8)), "labels": ("I32", (2, 5))}
    assert float(header.meta["loss"]) == 0.1 + 0.2
    back = unpack(got.data)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())


def test_an_oversized_blob_is_refused_at_its_first_frame_and_the_stream_goes_on():
    big = pack({"hidden": torch.zeros(1000)})
    small = pack({"hidden": torch.ones(3)})
    assembler = Reassembler(max_bytes=1000)
    first, *rest = frames(big, "acts", 0, 0, chunk_bytes=512)
    with pytest.raises(WireError, match=r"'acts' blob of \d+ bytes exceeds the limit of 1000"):
        assembler.feed(first)
    assert all(assembler.feed(c) is None for c in rest)  # the rest is skipped quietly
    (only,) = frames(small, "acts", 1, 1, chunk_bytes=512)
    assert assembler.feed(only).data == small


def test_a_blob_that_lies_about_its_size_is_refused():
    blob = pack({"hidden": torch.zeros(100)})
    chunks = list(frames(blob, "acts", 0, 0, chunk_bytes=128))
    chunks[0].total_bytes = 200  # announces less than it sends
    assembler = Reassembler(max_bytes=1 << 20)
    with pytest.raises(WireError, match="grew past its announced 200 bytes"):
        for c in chunks:
            assembler.feed(c)


def test_frames_out_of_order_are_refused():
    chunks = list(frames(pack({"x": torch.zeros(100)}), "acts", 0, 0, chunk_bytes=128))
    assembler = Reassembler(max_bytes=1 << 20)
    assembler.feed(chunks[0])
    with pytest.raises(WireError, match="chunk 2 of blob 0 arrived while blob 0 expected chunk 1"):
        assembler.feed(chunks[2])


@pytest.mark.parametrize(("blob", "message"), [
    (b"\x01\x02", "too short"),
    ((10**9).to_bytes(8, "little") + b"{}", "header claims 1000000000 bytes"),
    ((4).to_bytes(8, "little") + b"nope", "not valid JSON"),
    ((14).to_bytes(8, "little") + b'{"x": {"a":1}}', "lacks a dtype or shape"),
])
def test_garbage_headers_are_refused_with_a_reason(blob, message):
    with pytest.raises(WireError, match=message):
        read_header(blob)
