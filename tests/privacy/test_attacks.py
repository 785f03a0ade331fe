"""The attacks recover a tiny model's inputs without a defence and fail under strong
noise, so a broken attack or a broken defence fails here (thresholds measured on the
tiny Llama: about 1.00 without noise for both, 0.19 / 0.00 at sigma 1)."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.data.e2e import load_e2e
from hsplitlora.models.split import split_model
from hsplitlora.privacy.attacks import (
    fit_inversion,
    label_leak,
    next_tokens,
    observe,
    optimise_inversion,
    recovery_rate,
    tail_gradients,
)
from hsplitlora.privacy.mechanism import Gaussian
from tests.conftest import E2E, tiny_model

BOUND = 4.0  # above every example's norm at the cut: clipping alone changes nothing


@pytest.fixture(scope="module")
def texts(tiny_tokenizer):
    """Public text (the attacker's) and a held-out client's, from disjoint E2E rows."""
    rows = [e.prompt + e.target for e in load_e2e([E2E / "original" / "devset.csv"])[:560]]
    enc = tiny_tokenizer(rows, padding=True, truncation=True, max_length=32,
                         return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return (ids[:512], mask[:512]), (ids[512:], mask[512:])


@pytest.mark.parametrize("cut", [1, 3])
def test_learned_inversion_recovers_tokens_and_noise_defeats_it(texts, cut):
    (pub, pub_mask), (priv, priv_mask) = texts
    segment, _ = split_model(tiny_model("llama"), cut)
    rates = {}
    for sigma in (0.0, 1.0):
        attacker = Gaussian(BOUND, sigma, seed=1) if sigma else None
        client = Gaussian(BOUND, sigma, seed=2) if sigma else None
        inv = fit_inversion(observe(segment, pub, pub_mask, attacker), pub, pub_mask,
                            steps=200)
        rates[sigma] = recovery_rate(inv(observe(segment, priv, priv_mask, client)), priv,
                                     priv_mask)
    assert rates[0.0] > 0.95
    assert rates[1.0] < 0.35  # what is left is the prior: E2E's most common tokens
    assert rates[0.0] - rates[1.0] > 0.6


def test_optimisation_inversion_recovers_tokens_and_noise_defeats_it(texts):
    _, (priv, priv_mask) = texts
    priv, priv_mask = priv[:16], priv_mask[:16]
    segment, _ = split_model(tiny_model("llama"), 1)
    vocab = torch.arange(segment.backbone.get_input_embeddings().num_embeddings)
    rates = {}
    for sigma in (0.0, 1.0):
        channel = Gaussian(BOUND, sigma, seed=2) if sigma else None
        seen = observe(segment, priv, priv_mask, channel)
        found = optimise_inversion(segment, seen, priv_mask, vocab, clip=BOUND, steps=100)
        rates[sigma] = recovery_rate(found, priv, priv_mask)
    assert rates[0.0] > 0.95
    assert rates[1.0] < 0.1


def test_vanilla_split_gives_the_labelled_tokens_away():
    ids = torch.tensor([[5, 6, 7, 8, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 1, -100]])  # loss on the target only
    assert label_leak(ids, mask, labels) == pytest.approx(3 / 5)
    assert label_leak(ids, mask, None) == 0.0  # U-shaped: the labels stay home


@pytest.mark.parametrize("tail", [1, 2])
def test_a_u_shaped_clients_tail_gradient_gives_its_labels_away(texts, tail):
    """The labels never travel, but the gradient the tail returns at L - t does: a map
    learned on public text with the base model's tail reads the client's next tokens
    back. Taken on decoy labels (the same tokens, shuffled over every position), the
    gradients give the decoys back, not the true labels: the map reads the gradient,
    not the text's statistics."""
    (pub, pub_mask), (priv, priv_mask) = texts
    model = tiny_model("llama")

    def labelled(ids, mask):
        return ids.masked_fill(~mask.bool(), -100)

    seen_pub = tail_gradients(model, tail, pub, pub_mask, labelled(pub, pub_mask))
    target, where = next_tokens(labelled(pub, pub_mask))
    inv = fit_inversion(seen_pub, target, where, steps=300)
    truth, real = next_tokens(labelled(priv, priv_mask))
    seen = tail_gradients(model, tail, priv, priv_mask, labelled(priv, priv_mask))
    rate = recovery_rate(inv(seen), truth, real)
    shuffled = priv.clone()
    on = priv_mask.bool()
    shuffled[on] = priv[on][torch.randperm(int(on.sum()), generator=torch.Generator()
                                           .manual_seed(0))]
    decoy = tail_gradients(model, tail, priv, priv_mask, labelled(shuffled, priv_mask))
    decoy_truth, _ = next_tokens(labelled(shuffled, priv_mask))
    found = inv(decoy)
    print(f"\ntail {tail}: labels recovered {rate:.3f}; from decoy gradients "
          f"{recovery_rate(found, truth, real):.3f} of the true, "
          f"{recovery_rate(found, decoy_truth, real):.3f} of the decoys")
    assert rate > 0.9, rate
    assert recovery_rate(found, truth, real) < 0.2  # about the chance two tokens agree
    assert recovery_rate(found, decoy_truth, real) > 0.8  # it read the decoys
