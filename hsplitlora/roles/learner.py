"""The centralized baseline as a role: one party, the whole model, all the data."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from hsplitlora.models.lora import load_lora_state, lora_parameters, lora_state
from hsplitlora.models.split import arch_spec
from hsplitlora.roles.party_state import load_party_state, party_state
from hsplitlora.runtime.compile import compiled_blocks
from hsplitlora.runtime.optim import Optimizer, OptimSettings, autocast, target_logits, token_loss

__all__ = ["Learner"]


class Learner:
    """A party that holds the whole model: forward, loss, backward and step in one place.

    Alone it is centralized LoRA (CenLoRA); one per client, averaged by a fed server, it
    is federated LoRA (FedLoRA).
    """

    def __init__(self, model: nn.Module, batches: Iterator[dict[str, torch.Tensor]],
                 optim: OptimSettings, *, precision: str = "bf16",
                 device: torch.device | str = "cpu", label_smoothing: float = 0.0,
                 client_id: int | None = None, num_samples: int = 0,
                 compile: bool = False) -> None:
        self.client_id = client_id
        self.num_samples = num_samples
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.batches = batches
        self.precision = precision
        self.label_smoothing = label_smoothing
        self.compile = compile
        self.optimizer = Optimizer(lora_parameters(model), optim)
        # The decoder stack (final norm included) and the LM head, called apart so the
        # head runs on target positions only (runtime.optim.target_logits).
        spec = arch_spec(self.model.config)
        self._backbone = getattr(self.model, spec.backbone)
        self._blocks = getattr(self._backbone, spec.blocks)
        self._head = self.model.get_output_embeddings()

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    def step(self) -> tuple[float, int]:
        batch = {k: v.to(self.device) for k, v in next(self.batches).items()}
        self.model.train()
        with autocast(self.precision, self.device), compiled_blocks(self._blocks, self.compile):
            hidden = self._backbone(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"],
                                    use_cache=False).last_hidden_state
            logits, targets = target_logits(hidden, self._head, batch["labels"])
        loss, tokens = token_loss(logits, targets, self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), tokens

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return lora_state(self.model)

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        load_lora_state(self.model, state)

    def upload(self) -> dict[str, torch.Tensor]:
        """What it sends to aggregation: its adapters as they are (``privacy`` covers the
        split modes' clients; the config refuses it for unsplit ones)."""
        return self.adapter_state()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on exactly as this learner would: adapters,
        optimizer (with the LR schedule's position), batch-stream position and RNG."""
        return party_state(self, {"batches": self.batches})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_party_state(self, state, {"batches": self.batches})
