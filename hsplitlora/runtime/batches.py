"""Endless, seeded mini-batch streams over one party's shard."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from hsplitlora.data.tokenize import collate

__all__ = ["BatchStream", "batch_stream", "stream_state"]


def batch_stream(
    features: Sequence[dict[str, list[int]]], batch_size: int, seed: int, pad_id: int,
    multiple: int = 1,
) -> BatchStream:
    """Batches forever, reshuffling each epoch from a private generator.

    A private generator (not the global RNG) keeps a party's data order independent of
    how many other parties draw random numbers, so the same seed gives the same batches
    in every mode. The last partial batch of an epoch is kept rather than dropped: small
    shards would otherwise lose a noticeable share of their data. Widths are rounded up
    to a multiple of ``multiple`` (``data.pad_to_multiple_of``).
    """
    if not features:
        raise ValueError("cannot draw batches from an empty shard")
    return BatchStream(features, batch_size, seed, pad_id, multiple)


def stream_state(stream: Iterator[Any] | None) -> dict[str, Any] | None:
    """A batch stream's position, if it can tell (a :class:`BatchStream` can)."""
    save = getattr(stream, "state_dict", None)
    return save() if save is not None else None


class BatchStream:
    """The iterator :func:`batch_stream` returns. A class rather than a generator so a
    role holding one can be pickled mid-stream (to a Ray actor) and carry on there."""

    def __init__(self, features: Sequence[dict[str, list[int]]], batch_size: int, seed: int,
                 pad_id: int, multiple: int = 1) -> None:
        self.features = features
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.multiple = multiple
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.pos = 0

    def __iter__(self) -> BatchStream:
        return self

    def restart(self) -> BatchStream:
        """The same stream from its first batch."""
        return BatchStream(self.features, self.batch_size, self.seed, self.pad_id,
                           self.multiple)

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands (generator, epoch order, position), so a restored copy
        draws exactly the batches this one would draw next."""
        return {"gen": self.gen.get_state(), "order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.pos = list(state["order"]), int(state["pos"])

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.pos >= len(self.order):
            self.order = torch.randperm(len(self.features), generator=self.gen).tolist()
            self.pos = 0
        chosen = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return collate([self.features[j] for j in chosen], pad_id=self.pad_id,
                       multiple=self.multiple)
