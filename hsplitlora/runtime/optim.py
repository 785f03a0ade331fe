"""What every training party shares: its optimizer, LR schedule, precision and loss.

Each party (centralized learner, client, main server) owns an AdamW over its own LoRA
parameters. AdamW is per-parameter, so split optimizers step exactly like one optimizer
over the union of parameters: that is what lets SplitLoRA with one client reproduce
centralized LoRA step for step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OptimSettings", "Optimizer", "autocast", "causal_lm_loss", "target_logits",
           "token_loss"]


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 2e-4
    weight_decay: float = 0.01
    eps: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    total_steps: int = 1
    schedule: str = "linear"  # "linear" decays to 0 after warm-up; "constant" holds
    grad_clip: float = 0.0
    # HetLoRA's rank regulariser on each step (models.lora.tail_penalty); lambda 0 = off
    tail_gamma: float = 1.0
    tail_lambda: float = 0.0


class Optimizer:
    """AdamW + warm-up/decay schedule + optional clipping over one party's parameters."""

    def __init__(self, params: Sequence[nn.Parameter], settings: OptimSettings) -> None:
        self.settings = settings
        self.steps_done = 0
        self.reset(params)

    def reset(self, params: Sequence[nn.Parameter]) -> None:
        """Start AdamW afresh on new parameters (re-initialised or re-planned adapters),
        continuing the LR schedule where it was: moments of old adapters mean nothing for
        new ones, but the run's warm-up and decay should not restart."""
        self.params = list(params)
        s = self.settings
        self.opt = torch.optim.AdamW(
            self.params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay
        ) if self.params else None
        self._offset = self.steps_done  # the schedule's position when these adapters began
        self.sched = (
            torch.optim.lr_scheduler.LambdaLR(self.opt,
                                              lambda step: self._factor(step + self._offset))
            if self.opt else None
        )

    def forget(self, params: Collection[nn.Parameter]) -> None:
        """Fresh AdamW moments for ``params`` only (adapters re-drawn in place while the
        others train on with theirs); the schedule goes on."""
        if self.opt is not None:
            for p in params:
                self.opt.state.pop(p, None)

    def _factor(self, step: int) -> float:
        s = self.settings
        if step < s.warmup_steps:
            return (step + 1) / (s.warmup_steps + 1)
        if s.schedule == "constant":
            return 1.0
        remaining = max(s.total_steps - step, 0)
        return remaining / max(s.total_steps - s.warmup_steps, 1)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"] if self.opt else 0.0

    def step(self) -> None:
        if self.opt is None:
            return
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps_done += 1

    def state_dict(self) -> dict:
        position = {"steps_done": self.steps_done, "offset": self._offset}
        if self.opt is None:  # nothing to train, but the schedule's position still counts
            return position
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), **position}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = state.get("steps_done", self.steps_done)
        self._offset = state.get("offset", 0)
        if self.opt is not None and "opt" in state:
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """bf16 autocast (CPU and CUDA) or nothing for fp32."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over target tokens (labels != -100).

    Returns the loss and the number of target tokens, which weights it in any average
    across batches (perplexity is exp of the token-weighted mean).
    """
    return token_loss(logits[:, :-1, :].reshape(-1, logits.size(-1)),
                      labels[:, 1:].reshape(-1), label_smoothing)


def target_logits(hidden: torch.Tensor, head: nn.Module,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head applied only where the next token is a target: ``(logits, targets)``.

    Training needs no logits at prompt and padding positions, and on E2E they are about
    half of all positions. Skipping them saves the head's matmul there (with a 49k
    vocabulary, a fifth of SmolLM2's FLOPs) and the vocabulary-wide fp32 softmax, its
    backward and the cast: about 10 % of a training step. The loss is the same as
    :func:`causal_lm_loss` on the full logits.
    """
    shift_labels = labels[:, 1:]
    keep = shift_labels != -100
    return head(hidden[:, :-1][keep]), shift_labels[keep]


def token_loss(logits: torch.Tensor, targets: torch.Tensor,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of ``logits [n, V]`` against ``targets [n]`` (-100: ignored),
    in fp32; returns it with the number of counted targets."""
    loss = F.cross_entropy(logits.float(), targets, ignore_index=-100,
                           label_smoothing=label_smoothing)
    return loss, int((targets != -100).sum())
