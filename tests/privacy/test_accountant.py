"""The accountant wrapper reports what Opacus computes, and counts the run's releases."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

from hsplitlora.config import RunConfig
from hsplitlora.privacy.accountant import epsilon, noise_for, privacy_report


def test_rdp_epsilon_equals_opacus_analysis():
    """sigma 1.1, q 0.01, 1000 steps, delta 1e-5 (the DP-SGD paper's MNIST regime)."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=0.01, noise_multiplier=1.1, steps=1000, orders=orders)
    want, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    got = epsilon(1.1, 0.01, 1000, 1e-5, "rdp")
    assert got == pytest.approx(want, rel=1e-12)
    assert got == pytest.approx(1.7118, abs=1e-4)  # pinned: a changed library shows here


def test_prv_epsilon_equals_opacus_and_is_tighter_than_rdp():
    acc = PRVAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=0.01)
    for _ in range(999):
        acc.step(noise_multiplier=1.1, sample_rate=0.01)
    want = acc.get_epsilon(delta=1e-5)
    got = epsilon(1.1, 0.01, 1000, 1e-5, "prv")
    assert got == pytest.approx(want, rel=1e-6)
    assert got < epsilon(1.1, 0.01, 1000, 1e-5, "rdp")


def test_edge_cases_and_the_inverse():
    assert epsilon(0.0, 0.1, 10, 1e-5) == math.inf
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    sigma = noise_for(4.0, 0.05, 200, 1e-5)
    assert epsilon(sigma, 0.05, 200, 1e-5) == pytest.approx(4.0, abs=0.05)


def test_report_counts_each_clients_releases_and_takes_the_worst():
    cfg = RunConfig.model_validate({
        "train": {"num_clients": 2, "batch_size": 4},
        "privacy": {"enabled": True, "activation_clip": 1.0, "activation_noise": 1.0,
                    "adapter_clip": 0.5, "adapter_noise": 2.0, "delta": 1e-4}})
    records = ([{"step": i, "client": i % 2, "round": i // 2} for i in range(30)]
               + [{"step": 30, "client": 1, "round": 15}]
               + [{"event": "aggregate", "side": "client", "clients": [0, 1]}] * 3)
    report = privacy_report(cfg, {0: 100, 1: 40}, records)
    # client 1: 16 releases at rate 4/40, worse than client 0's 15 at 4/100
    assert report["epsilon_activations"] == epsilon(1.0, 0.1, 16, 1e-4)
    assert report["epsilon_adapter"] == epsilon(2.0, 1.0, 3, 1e-4)
    assert report["privacy_delta"] == 1e-4
