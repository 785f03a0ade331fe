"""What an honest-but-curious main server can learn from what a client sends.

Two published families of input reconstruction from smashed activations, and the label
leak of vanilla split learning; each reports the fraction of the client's real (non-pad)
tokens it recovers exactly. The attacker knows the base model's client segment and the
privacy mechanism's settings (they are in the run's config), so it trains and matches
on activations noised as the client's are. docs/privacy.md describes the threat model.

* :func:`fit_inversion`: a learned inversion model (the inverse-network attack of He et
  al., "Model inversion attacks against collaborative inference", ACSAC 2019): a
  per-position MLP from the activation at the cut to the token, trained on public text.
* :func:`optimise_inversion`: optimisation-based inversion (He et al.'s white-box
  attack; Erdogan et al., "UnSplit", 2022): a softmax over candidate tokens per position,
  fitted so the segment's output matches what was observed, then projected to the most
  likely token (the relaxation makes the discrete search differentiable).

Labels. In vanilla split learning they travel in clear (:func:`label_leak`). A U-shaped
client keeps them, but returns the gradient of its tail's loss at ``L - t``
(:func:`tail_gradients`), whose direction at each position is dominated by the head's
row of the next token. The server can learn that map on public text with the public base
model's tail, exactly as it learns the input inversion (:func:`fit_inversion` on the
gradients, targets the next tokens: :func:`next_tokens`), the gradient-inversion family
of label attacks (Li et al., "Label leakage and protection in two-party split learning",
ICLR 2022, for binary labels; here per token over the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hsplitlora.models.split import ClientSegment, num_blocks, split_model
from hsplitlora.privacy.mechanism import Gaussian, clip_examples
from hsplitlora.runtime.optim import autocast, causal_lm_loss

__all__ = ["Inversion", "fit_inversion", "label_leak", "next_tokens", "observe",
           "optimise_inversion", "recovery_rate", "tail_gradients"]


@torch.no_grad()
def observe(segment: ClientSegment, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            channel: Gaussian | None = None, precision: str = "fp32") -> torch.Tensor:
    """The activations the server receives for these inputs (as fp32, eval mode;
    ``precision`` as the run trained: bf16 autocast over a bf16 base)."""
    segment.eval()
    with autocast(precision, torch.device("cpu")):
        hidden = segment(input_ids, attention_mask).float()
    return hidden if channel is None else channel.activations(hidden)


def recovery_rate(predicted: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> float:
    """Fraction of real tokens recovered exactly (the metric of every attack here)."""
    real = attention_mask.bool()
    return float((predicted == input_ids)[real].float().mean())


def label_leak(input_ids: torch.Tensor, attention_mask: torch.Tensor,
               labels: torch.Tensor | None) -> float:
    """Fraction of the client's real tokens the server reads straight from the labels it
    is sent (vanilla split: the target tokens; U-shaped: no labels, so 0)."""
    if labels is None:
        return 0.0
    real = attention_mask.bool()
    return float(((labels == input_ids) & real).sum() / real.sum())


def tail_gradients(model: nn.Module, tail: int, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, labels: torch.Tensor, *, batch: int = 8,
                   precision: str = "fp32") -> torch.Tensor:
    """What a U-shaped client with ``model``'s last ``tail`` blocks returns to the server
    for these examples: the gradient of its loss (as training takes it, over batches of
    ``batch``) w.r.t. the activations at ``L - tail`` [N, S, d], each position scaled to
    unit norm (the direction is what carries the label; the scale is the batch's token
    count). fp32, eval mode, nothing updated."""
    head, rest = split_model(model, num_blocks(model.config) - tail)
    head.eval()
    rest.eval()
    out = []
    for i in range(0, len(input_ids), batch):
        ids, mask, lab = (x[i:i + batch] for x in (input_ids, attention_mask, labels))
        with torch.no_grad(), autocast(precision, torch.device("cpu")):
            hidden = head(ids, mask).float()
        hidden.requires_grad_(True)
        with autocast(precision, torch.device("cpu")):
            logits = rest(hidden, mask)
        loss, _ = causal_lm_loss(logits, lab)
        (grad,) = torch.autograd.grad(loss, [hidden])
        out.append(grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-30))
    return torch.cat(out)


def next_tokens(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The label each position's loss scores (the next token) and where there is one:
    a causal LM's loss at position ``i`` is on ``labels[i + 1]``."""
    target = torch.full_like(labels, -100)
    target[:, :-1] = labels[:, 1:]
    return target.clamp_min(0), target != -100


@dataclass
class Inversion:
    """A learned map from one position's activation to its token, over ``vocab``."""

    vocab: torch.Tensor  # [V'] token ids the model can answer (those of the public text)
    mean: torch.Tensor  # [d] input standardisation, from the public activations
    std: torch.Tensor
    head: nn.Module

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head((hidden.float() - self.mean) / self.std)
        return self.vocab[logits.argmax(-1)]


def fit_inversion(hidden: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, *, width: int = 256, steps: int = 300,
                  lr: float = 3e-3, batch: int = 512, seed: int = 0) -> Inversion:
    """Train the inversion model on public activations ``hidden`` [N, S, d] of known
    ``input_ids``: cross-entropy at every real position. ``width`` 0 = a linear map.
    Tokens absent from the public text are outside its vocabulary (always missed)."""
    gen = torch.Generator().manual_seed(seed)
    real = attention_mask.bool()
    x, y = hidden.float()[real], input_ids[real]
    vocab, target = torch.unique(y, return_inverse=True)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    torch.manual_seed(seed)
    d = x.shape[1]
    head: nn.Module = (nn.Linear(d, len(vocab)) if width == 0 else
                       nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, len(vocab))))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        idx = torch.randint(len(x), (min(batch, len(x)),), generator=gen)
        loss = nn.functional.cross_entropy(head(x[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    return Inversion(vocab, mean, std, head)


def optimise_inversion(segment: ClientSegment, observed: torch.Tensor,
                       attention_mask: torch.Tensor, vocab: torch.Tensor, *,
                       clip: float | None = None, steps: int = 100, lr: float = 0.1,
                       precision: str = "fp32") -> torch.Tensor:
    """Token ids whose activations best match ``observed`` (least squares, the maximum
    likelihood fit under Gaussian noise), searched over a softmax per position on the
    candidate tokens ``vocab``; ``clip``: the client's clipping bound, applied to the
    candidates' activations as the client applies it to its own. CPU, as ``observe``."""
    segment.eval()
    backbone: Any = segment.backbone  # a transformers model: get_input_embeddings
    table = backbone.get_input_embeddings().weight.detach()[vocab].float()
    logits = torch.zeros(*observed.shape[:2], len(vocab), requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    weight = attention_mask.unsqueeze(-1).float()
    for _ in range(steps):
        with autocast(precision, torch.device("cpu")):
            embeds = logits.softmax(-1) @ table
            hidden = segment(None, attention_mask, inputs_embeds=embeds).float()
        if clip is not None:
            hidden = clip_examples(hidden, clip)
        loss = (((hidden - observed) ** 2) * weight).sum() / weight.sum()
        (grad,) = torch.autograd.grad(loss, [logits])
        opt.zero_grad()
        logits.grad = grad
        opt.step()
    return vocab[logits.detach().argmax(-1)]
