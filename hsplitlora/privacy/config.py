"""The ``privacy`` section of a run configuration: clipping bounds, noise, accountant.

Its defaults and the checks that need no weights live here, so a contradictory setting
is refused when the config is read, before the model loads (docs/privacy.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hsplitlora.section import Section

__all__ = ["PrivacyConfig", "delta_problem"]


class PrivacyConfig(Section):
    enabled: bool = Field(False, description="clip and noise what a client sends: its "
                          "smashed activations each step and, with adapter_clip, its "
                          "adapter update at each aggregation")
    activation_clip: float | None = Field(
        None, gt=0, description="C: L2 bound of each example's whole activation tensor "
        "[seq, d_model] at the cut; an example above it is scaled down to norm C")
    activation_noise: float = Field(
        0.0, ge=0, description="sigma: noise multiplier; N(0, (sigma C)^2) is added to "
        "every coordinate of the clipped activations")
    adapter_clip: float | None = Field(
        None, gt=0, description="S: L2 bound of a client's whole adapter update (its "
        "trained factors minus the last aggregate) uploaded at aggregation; null = "
        "uploads go unclipped and unnoised")
    adapter_noise: float = Field(0.0, ge=0, description="noise multiplier of the adapter "
                                 "update: N(0, (adapter_noise S)^2) per coordinate")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta epsilon is reported at; "
                         "must be below 1 / (examples in the smallest shard)")
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus accountant that turns the noise, sampling rate and "
        "number of releases into epsilon: rdp (Renyi DP, an upper bound) or prv "
        "(privacy random variables, tighter)")

    @model_validator(mode="after")
    def _bounded(self) -> PrivacyConfig:
        if not self.enabled:
            return self
        if self.activation_clip is None:
            raise ValueError("privacy.enabled needs privacy.activation_clip: noise means "
                             "nothing without a bound on each example's activation norm; "
                             "set e.g. privacy.activation_clip: 100 (a typical example's "
                             "norm at the cut) or privacy.enabled: false")
        if self.adapter_noise > 0 and self.adapter_clip is None:
            raise ValueError("privacy.adapter_noise needs privacy.adapter_clip (the bound "
                             "on a client's update the noise is scaled to); set "
                             "privacy.adapter_clip, or privacy.adapter_noise: 0")
        return self


def delta_problem(delta: float, examples: int, where: str) -> str | None:
    """Why ``delta`` is too large for a client of ``examples`` examples, or None: at
    delta >= 1/n a mechanism may publish one example outright and still meet (eps, delta)."""
    if examples > 0 and delta < 1 / examples:
        return None
    return (f"privacy.delta {delta:g} is not below 1 / (examples of the smallest client) = "
            f"1/{examples} ({where}): lower privacy.delta, e.g. to {0.1 / max(examples, 1):.0e}")
