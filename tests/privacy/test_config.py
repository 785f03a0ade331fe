"""Contradictory privacy settings are refused when the config is read, naming the fix."""

from __future__ import annotations

import pytest

from hsplitlora.config import ConfigError, load_config
from hsplitlora.train.preflight import preflight
from tests.conftest import tiny_config
from tests.train.golden.runs import config_for


def _load(*items: str):
    return load_config(None, ["privacy.enabled=true", *items])


@pytest.mark.parametrize("items, message", [
    ([], r"privacy.enabled needs privacy.activation_clip.*set e\.g\. privacy.activation_clip"),
    (["privacy.activation_clip=1", "privacy.adapter_noise=1"],
     r"privacy.adapter_noise needs privacy.adapter_clip"),
    (["privacy.activation_clip=1", "privacy.delta=0"], r"privacy.delta: .*greater than 0"),
    (["privacy.activation_clip=1", "privacy.delta=1"], r"privacy.delta: .*less than 1"),
    (["privacy.activation_clip=0"], r"privacy.activation_clip: .*greater than 0"),
    (["privacy.activation_clip=1", "train.mode=federated"],
     r"covers the split modes' clients \(.*splitlora.*\), not train.mode 'federated'"),
    (["privacy.activation_clip=1", "train.mode=hsplitlora"], r"not train.mode 'hsplitlora'"),
    (["privacy.activation_clip=1", "privacy.adapter_clip=1", "train.mode=split"],
     r"train.mode 'split' hands its adapter on instead; set privacy.adapter_clip: null"),
    (["privacy.activation_clip=1", "privacy.delta=0.01", "data.max_train_examples=400",
      "train.num_clients=4"],
     r"privacy.delta 0.01 is not below .* = 1/100 .*lower privacy.delta, e.g. to 1e-03"),
])
def test_contradictions_are_refused(items, message):
    with pytest.raises(ConfigError, match=message):
        _load(*items)


def test_a_consistent_section_and_the_default_validate():
    cfg = _load("privacy.activation_clip=50", "privacy.activation_noise=0.5",
                "privacy.adapter_clip=0.1", "privacy.adapter_noise=1", "privacy.accountant=prv")
    assert cfg.privacy.enabled and cfg.privacy.delta == 1e-5
    assert not load_config(None).privacy.enabled


def test_delta_too_large_for_the_smallest_shard_fails_before_the_weights_load():
    """Shards may be uneven (non-IID), so the check runs on the partition itself, in
    preflight, which needs only the model's config, not its weights."""
    cfg = config_for("splitlora")  # 60 examples over 3 clients
    cfg.privacy = cfg.privacy.model_copy(update={"enabled": True, "activation_clip": 1.0,
                                                 "delta": 0.01})
    preflight(cfg, tiny_config("llama"))  # 20 each: 0.01 < 1/20
    cfg.data = cfg.data.model_copy(update={"max_train_examples": None})  # the whole file
    with pytest.raises(ConfigError, match=r"privacy.delta 0.01 is not below 1 / \(examples "
                                          r"of the smallest client\) = 1/\d{3,} \(the data"):
        preflight(cfg, tiny_config("llama"))
