"""Wire formats: exact stays exact, half precision halves, int8 quarters, errors bounded."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsplitlora.roles.messages import Activations
from hsplitlora.transport.codec import (
    ST_DTYPES,
    decode,
    decode_activations,
    encode,
    encode_activations,
    wire_layout,
)


def _acts(batch=4, seq=96, hidden=576, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, hidden, generator=g)
    x[..., 3] *= 40  # an outlier channel, as real activations have
    labels = torch.randint(0, 49152, (batch, seq), generator=g)
    labels[:, :10] = -100
    return Activations(x, torch.ones(batch, seq, dtype=torch.int64), labels)


def _payload(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_the_exact_codec_is_lossless_for_every_tensor():
    acts = _acts()
    back = decode_activations(encode_activations(acts, "none"), "none", torch.float32)
    for name in ("hidden", "attention_mask", "labels"):
        a, b = getattr(acts, name), getattr(back, name)
        assert torch.equal(a, b) and a.dtype == b.dtype, name


@pytest.mark.parametrize(("codec", "ratio", "rel_error"),
                         [("bf16", 0.5, 2**-8), ("fp16", 0.5, 2**-11), ("int8", 0.27, 1 / 254)])
def test_compressed_codecs_meet_their_size_targets_on_a_smollm2_sized_hidden(codec, ratio,
                                                                           rel_error):
    acts = _acts()
    wire = encode_activations(acts, codec)
    hidden = {k: v for k, v in wire.items() if k.startswith("hidden")}
    assert _payload(hidden) / (acts.hidden.numel() * 4) <= ratio
    # against what the in-process run counts for fp32 (int64 mask and labels) as well
    assert _payload(wire) / acts.nbytes <= ratio
    back = decode_activations(wire, codec, torch.float32)
    assert torch.equal(back.labels, acts.labels) and torch.equal(back.attention_mask,
                                                                 acts.attention_mask)
    # error bound per channel, relative to that channel's largest magnitude
    scale = acts.hidden.abs().amax(dim=(0, 1))
    err = (back.hidden - acts.hidden).abs().amax(dim=(0, 1))
    assert bool((err <= scale * rel_error * (1 + 1e-4)).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 17), st.floats(1e-3, 1e3),
       st.integers(0, 2**31 - 1))
def test_int8_error_is_at_most_half_a_step_of_each_channel(b, s, d, magnitude, seed):
    x = torch.randn(b, s, d, generator=torch.Generator().manual_seed(seed)) * magnitude
    x[..., 0] = 0.0  # an all-zero channel must not divide by zero
    wire = encode("g", x, "int8")
    assert wire["g"].dtype == torch.int8 and wire["g.scale"].shape == (d,)
    back = decode(wire, "g", "int8", torch.float32)
    step = x.abs().amax(dim=(0, 1)) / 127
    assert bool(((back - x).abs() <= step / 2 * (1 + 1e-5) + 1e-30).all())
    assert torch.equal(back[..., 0], x[..., 0])


@pytest.mark.parametrize("codec", ["none", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wire_layout_describes_what_encode_sends(codec, dtype):
    x = torch.randn(2, 3, 8).to(dtype)
    wire = encode("hidden", x, codec)
    layout = wire_layout("hidden", codec, dtype, (2, 3, 8))
    assert {k: (ST_DTYPES[v.dtype], tuple(v.shape)) for k, v in wire.items()} == layout
    assert decode(wire, "hidden", codec, dtype).dtype == dtype


def test_an_unknown_codec_is_named_in_the_error():
    with pytest.raises(ValueError, match="unknown codec 'zip'; choose one of none, bf16"):
        encode("x", torch.zeros(1), "zip")
