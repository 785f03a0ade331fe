"""The training loss: the LM head on target positions only equals the full-logits loss."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.models.load import use_attention
from hsplitlora.runtime.optim import causal_lm_loss, target_logits, token_loss
from tests.conftest import tiny_model


def _labels(batch: int, seq: int) -> torch.Tensor:
    """Prompt, target and right padding of different lengths per row, like E2E batches."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (batch, seq), generator=g)
    for i in range(batch):
        prompt, length = 3 + 2 * i, seq - 4 * i
        labels[i, :prompt] = -100
        labels[i, length:] = -100
    return labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_target_only_head_gives_the_full_loss_and_gradient(smoothing):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = _labels(3, 12)
    hidden = torch.randn(3, 12, 16, requires_grad=True)
    full, n_full = causal_lm_loss(head(hidden), labels, smoothing)
    (g_full,) = torch.autograd.grad(full, hidden)
    logits, targets = target_logits(hidden, head, labels)
    part, n_part = token_loss(logits, targets, smoothing)
    (g_part,) = torch.autograd.grad(part, hidden)
    assert n_part == n_full == int((labels[:, 1:] != -100).sum())
    assert logits.shape == (n_full, 50)  # the head ran on target positions only
    torch.testing.assert_close(part, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_part, g_full, rtol=1e-6, atol=1e-7)
    assert g_part[:, -1].abs().max() == 0  # the last position predicts nothing


def test_auto_attention_is_eager_on_cpu_and_both_kernels_agree():
    model = tiny_model("llama").eval()
    ids = torch.randint(0, 300, (2, 10))
    assert use_attention(model, "sdpa", torch.device("cpu")) == "sdpa"
    with torch.no_grad():
        sdpa = model(input_ids=ids).logits
    assert use_attention(model, "auto", torch.device("cpu")) == "eager"
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
    assert use_attention(model, "auto", torch.device("cuda")) == "sdpa"
