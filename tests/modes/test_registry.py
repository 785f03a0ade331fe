"""The registry of modes: every mode declares its facts, and the facts agree with each
other and with the rest of the system."""

from __future__ import annotations

import dataclasses
import importlib
import typing

import pytest

from hsplitlora.config import RunConfig
from hsplitlora.modes import MERGING, MODES, Mode, mode_of
from hsplitlora.train.config import TrainConfig


def test_every_module_declares_one_mode_under_its_own_name():
    assert set(MODES) == {"centralized", "federated", "split", "splitfed", "splitlora",
                          "hsplitlora", "hetlora", "flexlora", "flora", "ffalora"}
    for name, mode in MODES.items():
        module = importlib.import_module(f"hsplitlora.modes.{name}")
        assert module.MODE is mode and isinstance(mode, Mode) and mode.name == name
        assert module.__doc__ and mode.summary  # says what it is


def test_every_fact_is_declared_with_a_valid_value():
    schedules = typing.get_args(Mode.__annotations__["schedule"]) or (
        "centralized", "relay", "parallel")
    aggregators = {"fedavg", "noisefree", "stack", "svd", "zeropad", None}
    for mode in MODES.values():
        for f in dataclasses.fields(Mode):
            assert hasattr(mode, f.name), (mode.name, f.name)
        assert mode.schedule in schedules
        assert mode.server in ("none", "shared", "per_participant")
        assert mode.aggregator in aggregators
        assert mode.placements and mode.placements <= {"inprocess", "ray", "grpc"}
        assert set(mode.trains) <= {"A", "B"} and mode.trains


def test_facts_agree():
    for mode in MODES.values():
        if mode.planned:  # a server side shared across cuts needs a merge to fold it in
            assert mode.schedule == "parallel" and mode.server in ("shared", "per_participant")
            assert mode.server == "per_participant" or mode.aggregator in (None, *MERGING)
        if mode.importance or mode.adaptive:
            assert mode.planned
        if not mode.split:  # nothing to put behind a network without a main server
            assert "grpc" not in mode.placements
        if mode.schedule == "centralized":
            assert mode.parties(7) == 1 and mode.rounds(5, 7, 2) == 35
        elif mode.schedule == "relay":
            assert mode.rounds(5, 3, 2) == 9  # 3 clients x 3 turns of at most 2 steps
        else:
            assert mode.rounds(5, 3, 2) == 5
            assert mode.parties(3) == (4 if mode.split else 3)
    assert mode_of("splitlora").server_steps(5, 3) == 15  # one adapter, every client's batch
    assert mode_of("splitfed").server_steps(5, 3) == 5


def test_the_config_accepts_exactly_the_registered_modes():
    assert set(typing.get_args(TrainConfig.model_fields["mode"].annotation)) == set(MODES)
    for name in MODES:
        assert RunConfig.model_validate({"train": {"mode": name}}).mode is MODES[name]
    with pytest.raises(ValueError, match="unknown training mode 'fedsgd'; the modes are"):
        mode_of("fedsgd")


def test_no_module_outside_the_registry_compares_mode_names():
    """What a mode means lives in its module: the rest of the package reads facts."""
    import pathlib
    import re

    root = pathlib.Path(importlib.import_module("hsplitlora").__file__).parent
    names = "|".join(MODES)
    literal = rf"""["'](?:{names})["']"""
    pattern = re.compile(rf"""\bmode\s*(?:==|!=|\bin\b|\bnot in\b)\s*\(?\s*{literal}""")
    found = []
    for path in root.rglob("*.py"):
        if path.parent.name == "modes":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) or re.search(rf"{literal}\s*:\s*[^\s#]", line):  # keys
                found.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)
