"""The engine still computes what main computed before the one-engine refactor.

The reference runs (tests/train/golden/) were written on that commit: tiny fp32 runs of
every mode, homogeneous and heterogeneous. A homogeneous mode must give the very same
adapters and losses (bit for bit on the machine that wrote them; 1e-6 allows for
another CPU kind's fp32 kernels); a heterogeneous
one merges its updates beside a shared base now (original + sum of updates instead of
updates added one by one), which reorders float additions: 1e-5, compared as each
matrix's update ``B @ A`` (a merged run's adapter is an SVD of its update, whose factors
a rounding difference may rotate).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hsplitlora.train.run import train
from tests.conftest import tiny_model
from tests.train.golden.make_golden import HERE
from tests.train.golden.runs import RUNS, config_for

HETERO = {"hsplitlora", "hetlora", "flexlora", "flora"}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_reproduces_its_reference(tiny_tokenizer, name):
    result = train(config_for(name), model=tiny_model(RUNS[name]["arch"]),
                   tokenizer=tiny_tokenizer, write=False, show_progress=False)
    tol = 1e-5 if name in HETERO else 1e-6
    want = json.loads((HERE / f"{name}.json").read_text())["losses"]
    got = [r["loss"] for r in result.records if "event" not in r]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=tol, rtol=0)
    reference = load_file(HERE / f"{name}.safetensors")
    assert set(result.adapter) == set(reference)
    if name not in HETERO:
        for k, v in reference.items():
            torch.testing.assert_close(result.adapter[k], v, atol=1e-6, rtol=0, msg=k)
        return
    for k in (k for k in reference if k.endswith(".lora_A.weight")):
        b = k.replace("lora_A", "lora_B")
        torch.testing.assert_close(result.adapter[b] @ result.adapter[k],
                                   reference[b] @ reference[k], atol=tol, rtol=0, msg=k)
