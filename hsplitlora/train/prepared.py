"""What every mode starts from, built once from the config by
:func:`~hsplitlora.train.run.prepare`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hsplitlora.config import RunConfig
from hsplitlora.data.tokenize import TokenizedDataset
from hsplitlora.hetero.armsc import Plan
from hsplitlora.models.lora import LoraSettings
from hsplitlora.train import engine

__all__ = ["Prepared"]


@dataclass
class Prepared:
    """Everything a mode needs, built once from the config."""

    cfg: RunConfig
    model: nn.Module  # unsplit, LoRA attached, initial adapters
    tokenizer: Any
    shards: list[TokenizedDataset]
    eval_features: TokenizedDataset | None
    lora: LoraSettings
    device: torch.device
    # heterogeneous: each client's (cut, ranks), kept current through re-plans
    plans: dict[int, tuple[int, dict[str, int]]] | None = None
    ran: Plan | None = None  # heterogeneous: the cost model's view of the plans that ran last
    attendance: engine.Attendance = engine.everyone  # the clients present in each round
    checkpoint: Path | None = None  # written as rounds end (train(checkpoint=True))
    resumed: dict[str, Any] | None = None  # the checkpoint to go on from
