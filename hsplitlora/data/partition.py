"""Split examples into client shards: IID, or non-IID by a Dirichlet prior over labels.

Shards are lists of example indices, so a partition is cheap to store, log and compare.
Examples are dealt in groups (by default all rows of one MR) so that no MR's references are
spread over clients, which would leak the same input into several shards.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import numpy as np

from hsplitlora.data.example import DataError, Example

__all__ = ["NO_LABEL", "Scheme", "dirichlet", "iid", "label_skew", "partition"]

Scheme = Literal["iid", "dirichlet"]

# The label of an example whose meta lacks the label key (some cleaned E2E MRs have no name).
NO_LABEL = "<none>"


def iid(
    examples: Sequence[Example], num_clients: int, seed: int, group_key: str = "mr"
) -> list[list[int]]:
    """Shards with the same distribution and sizes as equal as whole groups allow.

    Groups are shuffled, then dealt largest first, each to the currently smallest shard
    (ties to the lowest client). Sizes never end further apart than the largest group, and
    dealing largest first lets the last, smallest groups fill the gaps, so in practice they
    differ by about one small group. The stable sort keeps the shuffled order among groups of
    equal size, which is where the randomness lives.
    """
    groups = _groups(examples, group_key)
    _check_counts(num_clients, len(groups), group_key)
    rng = np.random.default_rng(seed)
    order = sorted(rng.permutation(len(groups)).tolist(), key=lambda g: -len(groups[g]))
    heap = [(0, client) for client in range(num_clients)]
    owner = [0] * len(groups)
    for g in order:
        size, client = heapq.heappop(heap)
        owner[g] = client
        heapq.heappush(heap, (size + len(groups[g]), client))
    return _shards(groups, owner, num_clients)


def dirichlet(
    examples: Sequence[Example],
    num_clients: int,
    alpha: float,
    seed: int,
    label_key: str = "name",
    group_key: str = "mr",
) -> list[list[int]]:
    """Non-IID shards: each label's examples go to clients in proportions ~ Dirichlet(alpha).

    The usual label-skew benchmark (Hsu et al., 2019), dealt in groups: a label's groups are
    shuffled and laid end to end, and each goes to the client whose slice of [0, 1) holds the
    group's midpoint. Small `alpha` concentrates each label on few clients; large `alpha`
    approaches IID. A group takes the label of its first example (for MR groups and an MR
    slot as label, all its rows agree). A client left empty gets the smallest group of the
    largest multi-group shard, so every client can train.
    """
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"dirichlet alpha must be a positive finite number; got {alpha}.")
    groups = _groups(examples, group_key)
    _check_counts(num_clients, len(groups), group_key)
    rng = np.random.default_rng(seed)

    groups_by_label: dict[str, list[int]] = {}  # insertion order keeps the draws deterministic
    for g, members in enumerate(groups):
        label = examples[members[0]].meta.get(label_key, NO_LABEL)
        groups_by_label.setdefault(label, []).append(g)

    owner = [0] * len(groups)
    for label_groups in groups_by_label.values():
        shuffled = [label_groups[i] for i in rng.permutation(len(label_groups))]
        bounds = np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))
        total = sum(len(groups[g]) for g in shuffled)
        start = 0
        for g in shuffled:
            midpoint = (start + len(groups[g]) / 2) / total
            client = int(np.searchsorted(bounds, midpoint, side="right"))
            owner[g] = min(client, num_clients - 1)  # float rounding can leave bounds[-1] < 1
            start += len(groups[g])

    _fill_empty_clients(owner, groups, num_clients)
    return _shards(groups, owner, num_clients)


def partition(
    examples: Sequence[Example],
    num_clients: int,
    scheme: Scheme,
    seed: int,
    *,
    alpha: float = 0.5,
    label_key: str = "name",
    group_key: str = "mr",
) -> list[list[int]]:
    """Dispatch to `iid` or `dirichlet`; `alpha` and `label_key` matter only for the latter."""
    if scheme == "iid":
        return iid(examples, num_clients, seed, group_key=group_key)
    if scheme == "dirichlet":
        return dirichlet(
            examples, num_clients, alpha, seed, label_key=label_key, group_key=group_key
        )
    raise ValueError(f"unknown partition scheme {scheme!r}; choose 'iid' or 'dirichlet'.")


def label_skew(
    examples: Sequence[Example], shards: Sequence[Sequence[int]], label_key: str = "name"
) -> float:
    """Mean total-variation distance between each shard's label distribution and the global one.

    0 means every client sees the labels in the global proportions; values near 1 mean each
    client sees labels the others hardly have. Worth logging next to any non-IID result.
    """
    def distribution(indices: Sequence[int]) -> Counter[str]:
        return Counter(examples[i].meta.get(label_key, NO_LABEL) for i in indices)

    if any(not shard for shard in shards):
        raise ValueError("label_skew needs non-empty shards; a shard here has no examples.")
    everything = distribution([i for shard in shards for i in shard])
    total = sum(everything.values())
    distances = []
    for shard in shards:
        counts = distribution(shard)
        distances.append(0.5 * sum(
            abs(counts[label] / len(shard) - everything[label] / total) for label in everything
        ))
    return float(np.mean(distances))


def _groups(examples: Sequence[Example], group_key: str) -> list[list[int]]:
    """Example indices grouped by ``meta[group_key]`` in first-seen order.

    An example without the key (e.g. JSONL data with no such field) is a group of its own,
    so missing metadata degrades to per-example dealing rather than one giant group.
    """
    by_key: dict[str, list[int]] = {}
    groups: list[list[int]] = []
    for index, ex in enumerate(examples):
        key = ex.meta.get(group_key)
        if key is None:
            groups.append([index])
        elif key in by_key:
            by_key[key].append(index)
        else:
            by_key[key] = [index]
            groups.append(by_key[key])
    return groups


def _check_counts(num_clients: int, num_groups: int, group_key: str) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1; got {num_clients}.")
    if num_groups < num_clients:
        raise DataError(
            f"cannot give each of {num_clients} clients a shard: the data has only {num_groups} "
            f"distinct {group_key!r} groups, and a group is never split. Use at most "
            f"{num_groups} clients (train.num_clients), or more data."
        )


def _fill_empty_clients(owner: list[int], groups: Sequence[Sequence[int]], k: int) -> None:
    """Move groups into empty clients; needs at least `k` groups, which the caller checked."""
    while True:
        members: list[list[int]] = [[] for _ in range(k)]
        for g, client in enumerate(owner):
            members[client].append(g)
        empty = [client for client in range(k) if not members[client]]
        if not empty:
            return
        donor = max(
            (client for client in range(k) if len(members[client]) > 1),
            key=lambda c: sum(len(groups[g]) for g in members[c]),
        )
        owner[min(members[donor], key=lambda g: len(groups[g]))] = empty[0]


def _shards(groups: Sequence[Sequence[int]], owner: Sequence[int], k: int) -> list[list[int]]:
    shards: list[list[int]] = [[] for _ in range(k)]
    for g, client in enumerate(owner):
        shards[client].extend(groups[g])
    return [sorted(shard) for shard in shards]
