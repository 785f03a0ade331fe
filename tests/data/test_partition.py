from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsplitlora.data.e2e import load_e2e
from hsplitlora.data.example import Example
from hsplitlora.data.partition import NO_LABEL, dirichlet, iid, label_skew, partition


def make_examples(group_sizes: Sequence[int], labels: Sequence[str] | None = None) -> list[Example]:
    """Group g has group_sizes[g] rows sharing mr "g<g>" and the label labels[g] as its name."""
    examples: list[Example] = []
    for g, size in enumerate(group_sizes):
        meta = {"mr": f"g{g}"}
        if labels is not None:
            meta["name"] = labels[g]
        examples.extend(Example(f"p{g}", f" t{i}", meta) for i in range(size))
    return examples


def assert_valid(examples: Sequence[Example], shards: list[list[int]], k: int) -> None:
    """Every index exactly once, no shard empty, no group in two shards."""
    assert len(shards) == k
    assert sorted(i for shard in shards for i in shard) == list(range(len(examples)))
    assert all(shard for shard in shards)
    owner: dict[object, int] = {}
    for client, shard in enumerate(shards):
        for i in shard:
            assert owner.setdefault(examples[i].meta.get("mr", i), client) == client


@pytest.fixture(scope="module")
def devset(e2e_dir: Path) -> list[Example]:
    return load_e2e([e2e_dir / "original/devset.csv", e2e_dir / "cleaned/devel-fixed.no-ol.csv"])


# --- iid ----------------------------------------------------------------------------------


def test_iid_equal_groups_give_equal_shards() -> None:
    examples = make_examples([2] * 12)
    shards = iid(examples, 4, seed=0)
    assert_valid(examples, shards, 4)
    assert [len(s) for s in shards] == [6, 6, 6, 6]


def test_iid_without_group_key_deals_single_examples() -> None:
    examples = [Example(f"p{i}", " t", {}) for i in range(10)]  # e.g. JSONL without "mr"
    shards = iid(examples, 3, seed=1)
    assert sorted(len(s) for s in shards) == [3, 3, 4]
    assert_valid(examples, shards, 3)


@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=40),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_iid_invariants(sizes: list[int], k: int, seed: int) -> None:
    examples = make_examples(sizes)
    if len(sizes) < k:
        with pytest.raises(ValueError, match=f"only {len(sizes)} distinct 'mr' groups"):
            iid(examples, k, seed)
        return
    shards = iid(examples, k, seed)
    assert_valid(examples, shards, k)
    lengths = [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= max(sizes)  # greedy-to-smallest guarantee
    assert shards == iid(examples, k, seed)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_iid_on_real_data_is_balanced_by_mr(devset: list[Example], k: int) -> None:
    shards = iid(devset, k, seed=0)
    assert_valid(devset, shards, k)
    lengths = [len(s) for s in shards]
    # The original and cleaned sets share some MRs; their rows stay in one shard.
    largest_group = max(Counter(ex.meta["mr"] for ex in devset).values())
    assert max(lengths) - min(lengths) <= largest_group
    assert abs(max(lengths) - len(devset) / k) <= largest_group


def test_iid_seed_controls_the_deal(devset: list[Example]) -> None:
    assert iid(devset, 4, seed=3) == iid(devset, 4, seed=3)
    assert iid(devset, 4, seed=3) != iid(devset, 4, seed=4)


# --- dirichlet ----------------------------------------------------------------------------


def test_dirichlet_fills_every_client_even_when_alpha_is_tiny() -> None:
    examples = make_examples([3] * 10, labels=["a"] * 10)
    for seed in range(5):
        shards = dirichlet(examples, 10, alpha=1e-3, seed=seed)
        assert_valid(examples, shards, 10)
        assert [len(s) for s in shards] == [3] * 10  # one group each: the only way


def test_dirichlet_needs_as_many_groups_as_clients() -> None:
    with pytest.raises(ValueError, match="only 3 distinct 'mr' groups.*at most 3 clients"):
        dirichlet(make_examples([5, 5, 5], labels="abc"), 4, alpha=1.0, seed=0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), float("nan")])
def test_dirichlet_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        dirichlet(make_examples([1, 1], labels="ab"), 2, alpha=alpha, seed=0)


def test_missing_label_is_its_own_value() -> None:
    """Rows without the label key (cleaned MRs without name[...]) form the label NO_LABEL."""
    examples = make_examples([2] * 6, labels=["a", "a", "a", "b", "b", "b"])
    examples += [Example("q", " t", {"mr": "unnamed"}) for _ in range(4)]
    shards = dirichlet(examples, 2, alpha=0.5, seed=0)
    assert_valid(examples, shards, 2)
    assert label_skew(examples, [list(range(12)), list(range(12, 16))]) == pytest.approx(0.5)
    assert {examples[i].meta.get("name", NO_LABEL) for i in range(12, 16)} == {NO_LABEL}


def mean_skew(examples: list[Example], k: int, alpha: float, label_key: str) -> float:
    skews = [
        label_skew(examples, dirichlet(examples, k, alpha, seed, label_key=label_key), label_key)
        for seed in range(5)
    ]
    return sum(skews) / len(skews)


@pytest.mark.parametrize("label_key", ["name", "eatType", "area", "food", "customer rating"])
def test_small_alpha_skews_labels_more_than_large_alpha(
    devset: list[Example], label_key: str
) -> None:
    k = 5
    iid_skew = sum(label_skew(devset, iid(devset, k, s), label_key) for s in range(5)) / 5
    skews = [mean_skew(devset, k, alpha, label_key) for alpha in (0.05, 1.0, 100.0)]
    assert skews[0] > skews[1] > skews[2]
    assert skews[0] > 0.4 > 0.15 > skews[2]
    assert skews[2] < 2 * iid_skew + 0.02  # large alpha approaches IID


def test_dirichlet_on_real_data_is_valid_and_deterministic(devset: list[Example]) -> None:
    for alpha in (0.05, 1.0):
        shards = dirichlet(devset, 8, alpha, seed=11, label_key="food")
        assert_valid(devset, shards, 8)
        assert shards == dirichlet(devset, 8, alpha, seed=11, label_key="food")
    assert dirichlet(devset, 8, 1.0, seed=11) != dirichlet(devset, 8, 1.0, seed=12)


# --- partition / label_skew ---------------------------------------------------------------


def test_partition_dispatches(devset: list[Example]) -> None:
    assert partition(devset, 3, "iid", seed=5) == iid(devset, 3, 5)
    assert partition(devset, 3, "dirichlet", seed=5, alpha=0.3, label_key="area") == dirichlet(
        devset, 3, 0.3, 5, label_key="area"
    )
    with pytest.raises(ValueError, match="unknown partition scheme 'pathological'"):
        partition(devset, 3, "pathological", seed=5)  # type: ignore[arg-type]


def test_label_skew_is_total_variation_from_the_global_mix() -> None:
    examples = make_examples([1, 1, 1, 1], labels=["a", "a", "b", "b"])
    assert label_skew(examples, [[0, 2], [1, 3]]) == 0.0
    assert label_skew(examples, [[0, 1], [2, 3]]) == 0.5
    assert label_skew(examples, [[0], [1, 2, 3]]) == pytest.approx((0.5 + 1 / 6) / 2)
    with pytest.raises(ValueError, match="non-empty shards"):
        label_skew(examples, [[0, 1, 2, 3], []])
