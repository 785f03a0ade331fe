"""The reference runs of the uniform-plan equivalence tests: tiny fp32 runs of each
homogeneous mode, with partial attendance where the mode allows it."""

from __future__ import annotations

from typing import Any

from hsplitlora.config import RunConfig
from tests.conftest import E2E

RUNS: dict[str, dict[str, Any]] = {
    "centralized": {"arch": "llama", "train": {"mode": "centralized", "num_clients": 2}},
    "federated": {"arch": "llama", "train": {"mode": "federated", "num_clients": 3}},
    "split": {"arch": "gpt2", "train": {"mode": "split", "num_clients": 2}},
    "splitfed": {"arch": "llama", "train": {"mode": "splitfed", "num_clients": 3}},
    "splitlora": {"arch": "llama", "train": {"mode": "splitlora", "num_clients": 3}},
    "splitlora_gpt2": {"arch": "gpt2", "train": {"mode": "splitlora", "num_clients": 2,
                                                 "cut": 1}},
    "splitlora_partial": {"arch": "llama", "train": {"mode": "splitlora", "num_clients": 3},
                          "availability": 0.6},
}
# The heterogeneous modes on three clients with budgets of 1.2-3 MiB (per-client cuts and
# ranks); importance probing on, so the plans come from measured scores.
for _mode in ("hsplitlora", "hetlora", "flexlora", "flora"):
    RUNS[_mode] = {"arch": "llama", "train": {"mode": _mode, "num_clients": 3, "steps": 4,
                                              "lr": 0.01},
                   "hetero": {"scenario": {"kind": "heterogeneous",
                                           "memory_range": ["1.2 MiB", "3 MiB"], "seed": 1},
                              "rank_set": [0, 2, 4, 8], "server_rank": 4,
                              "probe_batches": 1}}
# written when HSplitLoRA's server side was one copy per client, which it still runs as
RUNS["hsplitlora"]["hetero"]["server_side"] = "per_participant"


def config_for(name: str) -> RunConfig:
    run = RUNS[name]
    train = dict(cut=2, steps=5, batch_size=2, agg_interval=2, lr=5e-3, precision="fp32",
                 warmup_steps=1, seed=3)
    train.update(run["train"])
    hetero = dict(run.get("hetero", {}))
    if "availability" in run:
        hetero = {"scenario": {"kind": "homogeneous", "availability": run["availability"]}}
    return RunConfig.model_validate({
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 60, "max_length": 160},
        "train": train,
        "hetero": hetero,
        "eval": {"max_examples": 0},
        "output": {"sample_prompt": None},
    })
