from __future__ import annotations

import dataclasses

import pytest

from hsplitlora.data.example import DataError, Example


def test_example_keeps_a_private_copy_of_meta() -> None:
    meta = {"mr": "name[A]"}
    ex = Example("p", " t", meta)
    meta["mr"] = "changed"
    assert ex.meta == {"mr": "name[A]"}


def test_example_is_frozen_and_compares_by_value() -> None:
    ex = Example("p", " t", {"k": "v"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.prompt = "q"  # type: ignore[misc]
    assert ex == Example("p", " t", {"k": "v"})
    assert Example("p", " t").meta == {}


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)
