"""Endless, seeded mini-batch streams over one party's shard."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch

from hsplitlora.data.tokenize import collate

__all__ = ["batch_stream"]


def batch_stream(
    features: Sequence[dict[str, list[int]]], batch_size: int, seed: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches forever, reshuffling each epoch from a private generator.

    A private generator (not the global RNG) keeps a party's data order independent of
    how many other parties draw random numbers, so the same seed gives the same batches
    in every mode. The last partial batch of an epoch is kept rather than dropped: small
    shards would otherwise lose a noticeable share of their data.
    """
    if not features:
        raise ValueError("cannot draw batches from an empty shard")
    gen = torch.Generator().manual_seed(seed)
    pad = functools.partial(collate, pad_id=pad_id)
    while True:
        order = torch.randperm(len(features), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            yield pad([features[j] for j in order[i : i + batch_size]])
