"""Header and value checks: every way an upload can be wrong gets a message that says how."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.transport.validate import check_activation_values, check_header
from hsplitlora.transport.wire import Header, WireError

LAYOUT = {"hidden": ("F32", ("B", "S", 8)), "labels": ("I32", ("B", "S"))}
LIMITS = {"B": (1, 4, "train.batch_size"), "S": (1, 16, "data.max_length")}


def _header(**tensors):
    base = {"hidden": ("F32", (2, 5, 8)), "labels": ("I32", (2, 5))}
    base.update(tensors)
    return Header({k: v for k, v in base.items() if v is not None})


def test_a_well_formed_header_binds_its_symbols():
    assert check_header(_header(), LAYOUT, LIMITS, "upload") == {"B": 2, "S": 5}


@pytest.mark.parametrize(("changes", "message"), [
    ({"labels": None}, r"missing \['labels'\], unexpected \[\]"),
    ({"extra": ("F32", (1,))}, r"missing \[\], unexpected \['extra'\]"),
    ({"hidden": ("F16", (2, 5, 8))}, "'hidden' has dtype F16, expected F32"),
    ({"hidden": ("F32", (2, 5, 9))}, r"'hidden' has shape \(2, 5, 9\), expected \(2, 5, 8\)"),
    ({"hidden": ("F32", (2, 5))}, r"'hidden' has shape \(2, 5\), expected \(B, S, 8\)"),
    ({"labels": ("I32", (2, 6))}, r"'labels' has shape \(2, 6\), expected \(2, 5\)"),
    ({"hidden": ("F32", (5, 5, 8)), "labels": ("I32", (5, 5))},
     r"dimension B = 5 is outside \[1, 4\] \(train.batch_size\)"),
    ({"hidden": ("F32", (2, 0, 8)), "labels": ("I32", (2, 0))},
     r"dimension S = 0 is outside \[1, 16\]"),
])
def test_malformed_headers_are_refused_with_the_reason(changes, message):
    with pytest.raises(WireError, match=message):
        check_header(_header(**changes), LAYOUT, LIMITS, "upload of client 3")


def _values(**changes):
    base = {"hidden": torch.zeros(2, 3, 4), "attention_mask": torch.ones(2, 3, dtype=torch.uint8),
            "labels": torch.tensor([[-100, 5, 9], [-100, -100, 0]], dtype=torch.int32)}
    base.update(changes)
    return base


def test_valid_values_pass():
    check_activation_values(_values(), 10, "upload")


@pytest.mark.parametrize(("changes", "message"), [
    ({"hidden": torch.full((2, 3, 4), float("inf"))}, "holds 24 non-finite values"),
    ({"attention_mask": torch.tensor([[1, 1, 3], [1, 0, 0]], dtype=torch.uint8)},
     "attention_mask must hold only 0 and 1"),
    ({"labels": torch.tensor([[-100, 5, 10], [0, 0, 0]], dtype=torch.int32)},
     r"token ids in \[0, 10\); found 10"),
    ({"labels": torch.tensor([[-1, 5, 9], [0, 0, 0]], dtype=torch.int32)}, "found -1"),
])
def test_bad_values_are_refused(changes, message):
    with pytest.raises(WireError, match=message):
        check_activation_values(_values(**changes), 10, "upload")
