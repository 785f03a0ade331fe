"""The Gaussian mechanism: clipping bounds every example, the noise has the scale it
claims, and the client sends (and back-propagates from) exactly the noised tensor."""

from __future__ import annotations

import itertools

import pytest
import torch

from hsplitlora.models.lora import LoraSettings, attach_lora, lora_parameters
from hsplitlora.models.split import split_model
from hsplitlora.privacy.config import PrivacyConfig
from hsplitlora.privacy.mechanism import Gaussian, clip_examples, clip_update
from hsplitlora.roles.client import Client
from hsplitlora.runtime.optim import OptimSettings
from tests.conftest import tiny_model


def test_clipping_bounds_every_examples_norm_and_leaves_small_ones_alone():
    torch.manual_seed(0)
    x = torch.randn(16, 7, 5) * torch.logspace(-2, 2, 16).view(-1, 1, 1)
    out = clip_examples(x, 1.5)
    norms, before = out.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1)
    assert (norms <= 1.5 * (1 + 1e-6)).all()
    small = before <= 1.5
    assert 0 < small.sum() < 16  # both kinds are present
    assert torch.equal(out[small], x[small])
    torch.testing.assert_close(norms[~small], torch.full_like(norms[~small], 1.5))
    # direction kept: a clipped example is a positive multiple of the original
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), x.flatten(1))
    torch.testing.assert_close(cos, torch.ones(16))


def test_update_is_clipped_as_one_vector():
    update = {"a": torch.full((3, 4), 1.0), "b": torch.full((2,), 2.0)}  # norm sqrt(20)
    out = clip_update(update, 1.0)
    total = torch.sqrt(sum((t ** 2).sum() for t in out.values()))
    assert float(total) == pytest.approx(1.0)
    assert float(out["b"][0] / out["a"][0, 0]) == pytest.approx(2.0)


def test_noise_has_standard_deviation_sigma_times_the_bound_and_is_seeded():
    x = torch.zeros(64, 32, 16)
    out = Gaussian(clip=2.0, noise=0.5, seed=1).activations(x)
    assert float(out.std()) == pytest.approx(1.0, rel=0.02)  # 0.5 x 2.0
    assert float(out.mean()) == pytest.approx(0.0, abs=0.01)
    assert torch.equal(out, Gaussian(clip=2.0, noise=0.5, seed=1).activations(x))
    assert not torch.equal(out, Gaussian(clip=2.0, noise=0.5, seed=2).activations(x))


def _client(privacy: PrivacyConfig, tiny_tokenizer) -> Client:
    model = attach_lora(tiny_model("llama"), LoraSettings(r=4, alpha=8))
    segment, _ = split_model(model, 2)
    ids = tiny_tokenizer(["name[Aromi], eatType[coffee shop]", "name[Loch Fyne]"],
                         padding=True, return_tensors="pt")
    batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
             "labels": ids["input_ids"].clone()}
    return Client(0, segment, itertools.repeat(batch), 10, OptimSettings(lr=1e-2),
                  precision="fp32", privacy=privacy, noise_seed=5)


def test_the_client_sends_clipped_activations_and_learns_through_the_clip(tiny_tokenizer):
    bound = 0.3
    client = _client(PrivacyConfig(enabled=True, activation_clip=bound), tiny_tokenizer)
    plain = client.segment(client.batches.__next__()["input_ids"]).detach()
    assert (plain.flatten(1).norm(dim=1) > bound).all()  # the bound binds
    sent = client.forward()
    assert torch.allclose(sent.hidden.flatten(1).norm(dim=1), torch.tensor(bound))
    before = [p.detach().clone() for p in lora_parameters(client.segment)]
    client.backward(torch.ones_like(sent.hidden))
    moved = [not torch.equal(a, p) for a, p in zip(before, lora_parameters(client.segment),
                                                    strict=True)]
    assert any(moved)  # the gradient reached the client's adapters through the clipping


def test_noised_upload_is_the_reference_plus_a_clipped_noised_update(tiny_tokenizer):
    cfg = PrivacyConfig(enabled=True, activation_clip=10.0, adapter_clip=1e-3)
    client = _client(cfg, tiny_tokenizer)
    start = client.adapter_state()
    for _ in range(3):
        client.forward()
        client.backward(torch.ones(client.pending.shape))
    trained = client.adapter_state()
    sent = client.upload()
    delta = torch.sqrt(sum(((sent[k] - start[k]) ** 2).sum() for k in sent))
    full = torch.sqrt(sum(((trained[k] - start[k]) ** 2).sum() for k in sent))
    assert float(full) > 1e-2  # the update is far above the bound...
    assert float(delta) == pytest.approx(1e-3, rel=1e-3)  # ...and is sent clipped to it
    client.load_adapter_state(sent)  # an aggregate becomes the next reference
    assert all(torch.equal(v, sent[k]) for k, v in client.upload().items())
