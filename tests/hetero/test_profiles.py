import pytest
import yaml
from pydantic import ValidationError

from hsplitlora.hetero.profiles import (
    LLAMA2_7B_PARAMS,
    PAPER_MEMORY_RANGE,
    PRESETS,
    DeviceProfile,
    ScenarioConfig,
    format_bytes,
    heterogeneous,
    homogeneous,
    parse_bytes,
    preset,
    scaled_memory_range,
)

GiB, MiB = 1 << 30, 1 << 20
SMOLLM2_135M_PARAMS = 134_515_008


@pytest.mark.parametrize("text, expected", [
    ("4 GiB", 4 * GiB), ("512MB", 512_000_000), ("1.5e9", 1_500_000_000), ("1.5 KiB", 1536),
    ("100", 100), (2048, 2048), (3.9, 3),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["4 GiBs", "lots", "-1 GB", -5, True])
def test_parse_bytes_rejects_what_it_cannot_read(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_format_bytes():
    assert format_bytes(3 << 29) == "1.5 GiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(-(5 << 20)) == "-5.0 MiB"
    assert format_bytes(3 << 40) == "3.0 TiB"


def test_profile_reads_human_sizes_and_rejects_nonsense():
    p = DeviceProfile.model_validate({"name": "x", "memory_bytes": "2 GiB", "flops": 1e12,
                                      "uplink_bps": 1e6, "downlink_bps": 1e7})
    assert p.memory_bytes == 2 * GiB and p.availability == 1.0
    with pytest.raises(ValidationError):
        DeviceProfile(name="x", memory_bytes=1, flops=-1.0, uplink_bps=1.0, downlink_bps=1.0)
    with pytest.raises(ValidationError):
        DeviceProfile.model_validate({**p.model_dump(), "gpus": 2})
    with pytest.raises(ValidationError):
        DeviceProfile(name="x", memory_bytes=1, flops=1.0, uplink_bps=1.0, downlink_bps=1.0,
                      availability=1.5)


def test_presets_are_ordered_from_phone_to_server():
    order = ["phone", "laptop", "edge_gpu", "workstation", "server"]
    assert list(PRESETS) == order
    for weaker, stronger in zip(order, order[1:], strict=False):
        assert PRESETS[weaker].flops < PRESETS[stronger].flops
        assert PRESETS[weaker].memory_bytes < PRESETS[stronger].memory_bytes
    assert PRESETS["phone"].uplink_bps < PRESETS["phone"].downlink_bps  # asymmetric mobile link
    with pytest.raises(ValueError, match="known presets are phone, laptop"):
        preset("tablet")


def test_homogeneous():
    clients = homogeneous(3, "phone")
    assert clients == [PRESETS["phone"]] * 3


def test_heterogeneous_is_seeded_uniform_and_keeps_the_base_device():
    lo, hi = 100 * MiB, 400 * MiB
    a = heterogeneous(200, seed=7, memory_range=(lo, hi), base="edge_gpu")
    assert a == heterogeneous(200, seed=7, memory_range=(lo, hi), base="edge_gpu")
    assert a != heterogeneous(200, seed=8, memory_range=(lo, hi), base="edge_gpu")
    memory = [p.memory_bytes for p in a]
    assert all(lo <= m <= hi for m in memory)
    assert (lo + hi) / 2 * 0.9 < sum(memory) / len(memory) < (lo + hi) / 2 * 1.1
    assert min(memory) < lo + 0.1 * (hi - lo) and max(memory) > hi - 0.1 * (hi - lo)
    assert {p.flops for p in a} == {PRESETS["edge_gpu"].flops}
    assert len({p.name for p in a}) == 200 and a[0].name == "edge_gpu-0"
    with pytest.raises(ValueError, match="low <= high"):
        heterogeneous(2, seed=0, memory_range=(hi, lo))


def test_scaled_memory_range_follows_the_parameter_count():
    assert scaled_memory_range(LLAMA2_7B_PARAMS) == PAPER_MEMORY_RANGE
    lo, hi = scaled_memory_range(SMOLLM2_135M_PARAMS)
    assert lo / MiB == pytest.approx(102.2, abs=0.1) and hi / MiB == pytest.approx(408.8, abs=0.1)
    assert hi == pytest.approx(4 * lo, rel=1e-6)
    with pytest.raises(ValueError):
        scaled_memory_range(0)


def test_scenario_kinds():
    assert ScenarioConfig().profiles(2, SMOLLM2_135M_PARAMS) == [PRESETS["laptop"]] * 2
    het = ScenarioConfig(kind="heterogeneous", seed=3).profiles(5, SMOLLM2_135M_PARAMS)
    lo, hi = scaled_memory_range(SMOLLM2_135M_PARAMS)
    assert all(lo <= p.memory_bytes <= hi for p in het)
    assert het == heterogeneous(5, 3, (lo, hi), "laptop")
    explicit = ScenarioConfig(kind="explicit", clients=[
        "phone", {"name": "pi", "memory_bytes": "1 GiB", "flops": 2e10, "uplink_bps": 1e6,
                  "downlink_bps": 1e6}])
    got = explicit.profiles(2, SMOLLM2_135M_PARAMS)
    assert got[0] == PRESETS["phone"] and got[1].name == "pi" and got[1].memory_bytes == GiB
    with pytest.raises(ValueError, match="lists 2 profiles but the run has 3 clients"):
        explicit.profiles(3, SMOLLM2_135M_PARAMS)
    assert ScenarioConfig().server_profile() == PRESETS["server"]


def test_scenario_from_yaml_with_a_custom_range():
    config = ScenarioConfig.model_validate(yaml.safe_load("""
        kind: heterogeneous
        preset: phone
        memory_range: [200 MiB, 1 GiB]
        seed: 11
    """))
    assert config.memory_range == (200 * MiB, GiB)
    profiles = config.profiles(4, SMOLLM2_135M_PARAMS)
    assert all(200 * MiB <= p.memory_bytes <= GiB for p in profiles)


@pytest.mark.parametrize("fields, message", [
    ({"preset": "tablet"}, "unknown device preset 'tablet'"),
    ({"memory_range": ["1 GiB", "2 GiB"]}, "only applies to kind 'heterogeneous'"),
    ({"kind": "heterogeneous", "memory_range": ["2 GiB", "1 GiB"]}, "low <= high"),
    ({"kind": "explicit"}, "needs a `clients` list"),
    ({"clients": ["phone"]}, "only applies to kind 'explicit'"),
    ({"kind": "explicit", "clients": ["phone", "toaster"]}, "unknown device preset 'toaster'"),
    ({"seeds": 3}, "Extra inputs are not permitted"),
])
def test_scenario_errors_say_what_to_fix(fields, message):
    with pytest.raises(ValidationError, match=message):
        ScenarioConfig.model_validate(fields)
