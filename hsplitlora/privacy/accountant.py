"""Epsilon of a run's noised releases, from Opacus's accountants (none written here).

A channel's releases are ``steps`` Gaussian mechanisms with noise multiplier ``noise``,
each on a ``sample_rate`` fraction of the protected units (examples of a client's shard
for activations; the client itself, rate 1, for its adapter uploads). docs/privacy.md
states the adjacency this assumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

__all__ = ["epsilon", "noise_for", "privacy_report"]

_ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def epsilon(noise: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``steps`` subsampled Gaussian releases (inf without
    noise, 0 without releases)."""
    if steps == 0:
        return 0.0
    if noise <= 0:
        return math.inf
    acc = _ACCOUNTANTS[accountant]()
    acc.history = [(noise, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def noise_for(target_epsilon: float, sample_rate: float, steps: int, delta: float,
              accountant: str = "rdp") -> float:
    """The noise multiplier that reaches ``target_epsilon`` (Opacus's search)."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant))


def privacy_report(cfg: Any, shard_sizes: Mapping[int, int],
                   records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The run's epsilons at ``privacy.delta``, counted from its metrics records: each
    client's steps are its activation releases (rate batch / shard size), each
    aggregation it took part in one adapter release. The worst client is reported."""
    pc, batch = cfg.privacy, cfg.train.batch_size
    steps = {cid: 0 for cid in shard_sizes}
    uploads = {cid: 0 for cid in shard_sizes}
    for r in records:
        if "event" not in r and r.get("client") in steps:
            steps[r["client"]] += 1
        elif r.get("event") == "aggregate" and r.get("side") == "client":
            for cid in r.get("clients", ()):
                uploads[cid] += 1
    acts = max(epsilon(pc.activation_noise, min(1.0, batch / shard_sizes[cid]), n, pc.delta,
                       pc.accountant) for cid, n in steps.items())
    report: dict[str, Any] = {"privacy_delta": pc.delta, "privacy_accountant": pc.accountant,
                              "epsilon_activations": acts}
    if pc.adapter_clip is not None:
        report["epsilon_adapter"] = max(epsilon(pc.adapter_noise, 1.0, n, pc.delta,
                                                pc.accountant) for n in uploads.values())
    return report
