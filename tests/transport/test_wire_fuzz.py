"""The frame and header reader under random and mutated input: it refuses, never breaks.

Whatever bytes a peer sends, :func:`read_header` returns a header whose every tensor fits
the data exactly, or raises :class:`WireError`; :func:`unpack` of an accepted header
gives exactly those tensors; the :class:`Reassembler` never holds more than its limit.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport.wire import Reassembler, WireError, pack, read_header, unpack

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _blob(header: object, data: bytes = b"\0" * 4) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _valid() -> bytes:
    g = torch.Generator().manual_seed(1)
    return pack({"hidden": torch.randn(2, 3, 4, generator=g),
                 "labels": torch.arange(6, dtype=torch.int32).reshape(2, 3)}, {"loss": "0.5"})


def _accepts_consistently(blob: bytes) -> None:
    """The property: a refusal is a WireError; an acceptance is what unpack then gives."""
    try:
        header = read_header(blob)
    except WireError:
        return
    try:
        tensors = unpack(blob)
    except WireError:
        return
    assert set(tensors) == set(header.tensors)
    for name, (_, shape) in header.tensors.items():
        assert tuple(tensors[name].shape) == shape


# The three headers that killed the main server (issue 15), and their relatives.
KILLERS = [
    ({"hidden": {"dtype": "F32", "shape": [2, 40, "1e400"], "data_offsets": [0, 4]}}, "shape"),
    ('{"hidden":{"dtype":"F32","shape":[2,40,1e400],"data_offsets":[0,4]}}', "shape"),
    ({"__metadata__": [1]}, "__metadata__ must map strings to strings"),
    ({"__metadata__": {"a": 1}}, "__metadata__ must map strings to strings"),
    ("[" * 100_000 + "]" * 100_000, "nests deeper"),
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "nests deeper"),
    ({"x": {"dtype": "F32", "shape": [10**40], "data_offsets": [0, 4]}}, "shape"),
    ({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "shape"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}, "data_offsets"),
    ({"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, "dtype 'Q4'"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "does not fill"),
    ({"x": [1, 2]}, "not an object"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "y": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "overlap or leave a gap"),
    ('{"x": 1' + "0" * 5000 + "}", "not valid JSON"),
    ("\xff\xfe", "not valid JSON"),
]


@pytest.mark.parametrize(("header", "message"), KILLERS)
def test_headers_that_killed_the_server_are_refused_with_a_reason(header, message):
    blob = _blob(header)
    with pytest.raises(WireError, match=message):
        read_header(blob)


def test_the_80_byte_upload_of_the_issue_is_refused():
    blob = _blob('{"hidden":{"dtype":"F32","shape":[2,40,1e400],"data_offsets":[0,4]}}')
    assert len(blob) <= 84
    with pytest.raises(WireError, match="'hidden' lacks a shape"):
        read_header(blob)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_or_read_consistently(blob):
    _accepts_consistently(blob)


@FUZZ
@given(st.binary(min_size=0, max_size=200))
def test_random_bytes_after_a_plausible_length_prefix(body):
    _accepts_consistently(struct.pack("<Q", min(len(body), 120)) + body)


@FUZZ
@given(st.data())
def test_a_valid_blob_with_random_byte_mutations(data):
    blob = bytearray(_valid())
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    _accepts_consistently(bytes(blob[:cut]) if data.draw(st.booleans()) else bytes(blob))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids,
                                                              max_size=4),
    max_leaves=12)
_dims = st.lists(st.integers(-2, 2**65) | st.floats() | st.booleans() | st.text(max_size=2),
                 max_size=9)
_entry = st.fixed_dictionaries(
    {}, optional={"dtype": st.sampled_from(["F32", "I32", "U8", "BF16", "F64", "zz"]) | _json,
                  "shape": _dims | _json, "data_offsets": _dims | _json})


@FUZZ
@given(st.dictionaries(st.text(max_size=6), _entry | _json, max_size=4),
       st.one_of(st.none(), _json, st.dictionaries(st.text(max_size=4), st.text(max_size=4))),
       st.binary(max_size=64))
def test_structured_random_headers_are_refused_or_read_consistently(entries, meta, data):
    header = dict(entries)
    if meta is not None:
        header["__metadata__"] = meta
    _accepts_consistently(_blob(header, data))


_chunks = st.lists(st.builds(
    pb.Chunk, seq=st.integers(0, 3), kind=st.sampled_from(["acts", "adapter", ""]),
    round=st.integers(0, 3), total_bytes=st.integers(0, 5000), index=st.integers(0, 4),
    last=st.booleans(), data=st.binary(max_size=1500)), max_size=20)


@FUZZ
@given(_chunks)
def test_the_reassembler_refuses_any_chunk_sequence_with_wire_errors_only(chunks):
    assembler = Reassembler(max_bytes=3000)
    for chunk in chunks:
        try:
            blob = assembler.feed(chunk)
        except WireError:
            continue
        assert assembler._size <= 3000  # never holds more than the limit
        if blob is not None:
            assert len(blob.data) <= 3000
            _accepts_consistently(blob.data)
