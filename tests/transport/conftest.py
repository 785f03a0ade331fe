"""Shared pieces of the transport tests: a tiny run config over a tiny Llama on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from hsplitlora.config import RunConfig
from tests.conftest import E2E


def run_config(model_dir: Path, out_dir: Path, name: str = "net", **train) -> RunConfig:
    base = dict(mode="splitlora", num_clients=3, cut=2, steps=4, batch_size=2, agg_interval=2,
                lr=5e-3, precision="fp32", seed=3, threads=1)
    base.update(train)
    return RunConfig.model_validate({
        "model": {"name": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 60, "max_length": 160},
        "train": base,
        "eval": {"max_examples": 0},
        "output": {"dir": str(out_dir), "name": name, "sample_prompt": None},
    })


def peft_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter a run folder holds, under the unsplit model's names."""
    state = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    return {k.removeprefix("base_model.model."): v for k, v in state.items()}
