"""Device profiles: what each client (and the main server) can spend on one training step.

A :class:`DeviceProfile` is four budgets and a presence probability:

* ``memory_bytes``: device memory the training process may use (frozen weights,
  activations kept for backward, adapters, gradients, optimizer state);
* ``flops``: *sustained* FLOP/s on training matmuls, not the datasheet peak. GPUs
  sustain roughly 30-50 % of peak on transformer training, phones far less;
* ``uplink_bps`` / ``downlink_bps``: link throughput in **bytes** per second;
* ``availability``: probability of taking part in a round (1.0 = always there). Training
  draws each round's attendance from it (:mod:`hsplitlora.train.attendance`), so the
  metrics, and the simulated clock replaying them, hold only the clients present; the
  planner ignores it.

Presets are order-of-magnitude assumptions for simulation, not measurements:

============  ============  =========  ============  ===========  ==========================
preset        memory        FLOP/s     uplink        downlink     modelled on
============  ============  =========  ============  ===========  ==========================
phone         3 GiB         1e12       11 Mbit/s     56 Mbit/s    flagship phone (Adreno 740
                                                                  class, ~3-4 TFLOP/s fp16
                                                                  peak) on a median mobile
                                                                  link (Ookla Speedtest
                                                                  Global Index, 2024)
laptop        4 GiB         4e12       40 Mbit/s     90 Mbit/s    RTX 3050 Laptop GPU (4 GB
                                                                  VRAM) on median fixed
                                                                  broadband
edge_gpu      16 GiB        8e12       100 Mbit/s    100 Mbit/s   Jetson AGX Orin 32 GB (half
                                                                  of its shared memory) on
                                                                  an edge-site link
workstation   24 GiB        3.3e13     1 Gbit/s      1 Gbit/s     RTX 4090 (~83 TFLOP/s bf16
                                                                  with fp32 accumulation) at
                                                                  40 % utilisation, wired LAN
server        80 GiB        1.25e14    10 Gbit/s     10 Gbit/s    A100 80 GB (312 TFLOP/s
                                                                  bf16) at 40 % utilisation,
                                                                  datacentre NIC
============  ============  =========  ============  ===========  ==========================

Scenarios turn a preset into one profile per client. *Homogeneous*: every client gets
the same preset. *Heterogeneous*: HSplitLoRA's setting, where clients share compute and
bandwidth (the ``base`` preset) but draw their memory budget uniformly from a range with
a seed. The paper draws 5-20 GB for LLaMA-2-7B; :func:`scaled_memory_range` scales that
range linearly with the parameter count (GiB taken as the unit), so every model sees the
same budgets *relative to its size*: SmolLM2-135M gets about 102-409 MiB. *Explicit*:
one preset name or full profile per client, as written in the config.
"""

from __future__ import annotations

import random
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

__all__ = [
    "LLAMA2_7B_PARAMS",
    "PAPER_MEMORY_RANGE",
    "PRESETS",
    "DeviceProfile",
    "ScenarioConfig",
    "format_bytes",
    "heterogeneous",
    "homogeneous",
    "parse_bytes",
    "preset",
    "scaled_memory_range",
]

GiB = 1 << 30
LLAMA2_7B_PARAMS = 6_738_415_616  # parameter count of LLaMA-2-7B (the paper's model)
PAPER_MEMORY_RANGE = (5 * GiB, 20 * GiB)  # HSplitLoRA's heterogeneous budgets for LLaMA-2-7B

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """A byte count from a number or a string like ``"4 GiB"``, ``"512MB"``, ``"1.5e9"``.

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB)
    powers of 1024, as the IEC prefixes define them.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a byte count, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a byte count cannot be negative, got {value!r}")
        return int(value)
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"cannot read {value!r} as a size: write a number of bytes or a number with one of "
            "the units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '4 GiB')"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    """A byte count for people: ``format_bytes(3 << 29) == '1.5 GiB'``."""
    sign, size = ("-" if n < 0 else ""), abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{sign}{size:.0f} {unit}" if unit == "B" else f"{sign}{size:.1f} {unit}"
        size /= 1024
    return f"{sign}{size:.1f} TiB"


ByteCount = Annotated[int, BeforeValidator(parse_bytes)]


class DeviceProfile(BaseModel):
    """What one device can spend per training step (see the module docstring for units)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="label shown in plans and logs")
    memory_bytes: ByteCount = Field(gt=0, description="memory budget, bytes or e.g. '4 GiB'")
    flops: float = Field(gt=0, description="sustained FLOP/s on training matmuls")
    uplink_bps: float = Field(gt=0, description="upload throughput, bytes per second")
    downlink_bps: float = Field(gt=0, description="download throughput, bytes per second")
    availability: float = Field(
        default=1.0, ge=0, le=1, description="probability of taking part in a round"
    )


_MBIT = 1e6 / 8  # bytes per second in one Mbit/s

PRESETS: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(name="phone", memory_bytes=3 * GiB, flops=1e12,
                      uplink_bps=11 * _MBIT, downlink_bps=56 * _MBIT),
        DeviceProfile(name="laptop", memory_bytes=4 * GiB, flops=4e12,
                      uplink_bps=40 * _MBIT, downlink_bps=90 * _MBIT),
        DeviceProfile(name="edge_gpu", memory_bytes=16 * GiB, flops=8e12,
                      uplink_bps=100 * _MBIT, downlink_bps=100 * _MBIT),
        DeviceProfile(name="workstation", memory_bytes=24 * GiB, flops=3.3e13,
                      uplink_bps=1000 * _MBIT, downlink_bps=1000 * _MBIT),
        DeviceProfile(name="server", memory_bytes=80 * GiB, flops=1.25e14,
                      uplink_bps=10_000 * _MBIT, downlink_bps=10_000 * _MBIT),
    )
}


def preset(name: str) -> DeviceProfile:
    """The named preset, or an error listing the known ones."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown device preset {name!r}: known presets are {', '.join(PRESETS)}; "
            "or give a full profile (name, memory_bytes, flops, uplink_bps, downlink_bps)"
        )
    return PRESETS[name]


def scaled_memory_range(
    model_params: int,
    reference: tuple[int, int] = PAPER_MEMORY_RANGE,
    reference_params: int = LLAMA2_7B_PARAMS,
) -> tuple[int, int]:
    """The paper's budget range scaled linearly to a model of ``model_params`` parameters."""
    if model_params <= 0:
        raise ValueError(f"model_params must be positive, got {model_params}")
    scale = model_params / reference_params
    return int(reference[0] * scale), int(reference[1] * scale)


def homogeneous(n: int, base: str | DeviceProfile = "laptop") -> list[DeviceProfile]:
    """``n`` clients with the same profile."""
    profile = preset(base) if isinstance(base, str) else base
    return [profile] * n


def heterogeneous(
    n: int,
    seed: int,
    memory_range: tuple[int, int],
    base: str | DeviceProfile = "laptop",
) -> list[DeviceProfile]:
    """``n`` clients sharing ``base``'s compute and links, memory drawn uniformly.

    The draw depends only on ``seed``, ``n`` and the range, so a scenario is reproducible.
    """
    lo, hi = memory_range
    if not 0 < lo <= hi:
        raise ValueError(f"memory_range must satisfy 0 < low <= high, got {memory_range}")
    profile = preset(base) if isinstance(base, str) else base
    rng = random.Random(seed)
    return [
        profile.model_copy(update={"name": f"{profile.name}-{i}",
                                   "memory_bytes": int(rng.uniform(lo, hi))})
        for i in range(n)
    ]


class ScenarioConfig(BaseModel):
    """The client population of a run, as the YAML config writes it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: Literal["homogeneous", "heterogeneous", "explicit"] = Field(
        default="homogeneous",
        description="homogeneous: every client is `preset`; heterogeneous: `preset`'s compute "
        "and links with memory drawn uniformly from `memory_range`; explicit: `clients`",
    )
    preset: str = Field(default="laptop", description="device preset of the clients (see PRESETS)")
    memory_range: tuple[ByteCount, ByteCount] | None = Field(
        default=None,
        description="heterogeneous: [low, high] memory budget (bytes or e.g. '200 MiB'); "
        "null = the paper's 5-20 GiB for LLaMA-2-7B scaled to this model's parameter count",
    )
    seed: int = Field(default=0, description="seeds the heterogeneous memory draw")
    clients: list[DeviceProfile | str] = Field(
        default_factory=list,
        description="explicit: one preset name or full profile per client, in client order",
    )
    server: DeviceProfile | str = Field(default="server", description="the main server's profile")
    availability: float | None = Field(
        default=None, gt=0, le=1, description="probability that each client takes part in a "
        "round, overriding the profiles' own; null = theirs (1.0 for the presets)")

    @model_validator(mode="after")
    def _consistent(self) -> ScenarioConfig:
        preset(self.preset)
        for entry in [*self.clients, self.server]:
            if isinstance(entry, str):
                preset(entry)
        if self.memory_range is not None:
            if self.kind != "heterogeneous":
                raise ValueError("memory_range only applies to kind 'heterogeneous'")
            lo, hi = self.memory_range
            if not 0 < lo <= hi:
                raise ValueError(f"memory_range must satisfy 0 < low <= high, got [{lo}, {hi}]")
        if self.kind == "explicit" and not self.clients:
            raise ValueError("kind 'explicit' needs a `clients` list (one entry per client)")
        if self.kind != "explicit" and self.clients:
            raise ValueError(f"`clients` only applies to kind 'explicit', not {self.kind!r}")
        return self

    def profiles(self, num_clients: int, model_params: int) -> list[DeviceProfile]:
        """One profile per client for a model with ``model_params`` parameters."""
        found = self._profiles(num_clients, model_params)
        if self.availability is None:
            return found
        return [p.model_copy(update={"availability": self.availability}) for p in found]

    def _profiles(self, num_clients: int, model_params: int) -> list[DeviceProfile]:
        if self.kind == "homogeneous":
            return homogeneous(num_clients, self.preset)
        if self.kind == "heterogeneous":
            memory = self.memory_range or scaled_memory_range(model_params)
            return heterogeneous(num_clients, self.seed, memory, self.preset)
        if len(self.clients) != num_clients:
            raise ValueError(
                f"scenario.clients lists {len(self.clients)} profiles but the run has "
                f"{num_clients} clients: list exactly one profile per client"
            )
        return [preset(c) if isinstance(c, str) else c for c in self.clients]

    def server_profile(self) -> DeviceProfile:
        return preset(self.server) if isinstance(self.server, str) else self.server
