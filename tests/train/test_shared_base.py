"""Every in-process party reads the one frozen base; only a merge ever writes to it."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.models.shared import merge_state
from hsplitlora.train import placement
from hsplitlora.train.hetero import HeteroSystem
from hsplitlora.train.run import train
from tests.conftest import tiny_model
from tests.train.golden.runs import config_for


def _frozen_ptrs(module: torch.nn.Module) -> list[int]:
    return [p.data_ptr() for n, p in module.named_parameters() if ".lora_" not in n]


def _modules(role) -> list[torch.nn.Module]:
    if hasattr(role, "segments"):  # the main server: one segment per participant
        return list(role.segments.values())
    return [role.segment if hasattr(role, "segment") else role.model]


@pytest.mark.parametrize("name", ["centralized", "federated", "split", "splitfed",
                                  "splitlora", "hsplitlora", "hetlora", "flora"])
def test_all_parties_share_the_frozen_base(tiny_tokenizer, monkeypatch, name):
    built = []
    place = placement.InProcess.place

    def spy(self, recipe, kind):
        role = place(self, recipe, kind)
        built.append(role)
        return role

    monkeypatch.setattr(placement.InProcess, "place", spy)
    model = tiny_model("gpt2" if name == "split" else "llama")
    base = set(_frozen_ptrs(model))
    result = train(config_for(name), model=model, tokenizer=tiny_tokenizer, write=False,
                   show_progress=False)
    assert result.model is model
    parties = [m for role in built for m in _modules(role)]
    assert len(parties) >= 2 or name == "centralized"
    for m in parties:
        ptrs = _frozen_ptrs(m)
        assert ptrs and set(ptrs) <= base, "a party holds frozen weights of its own"


def test_merges_are_the_only_writes_to_the_base(tiny_tokenizer, monkeypatch):
    """After every aggregation of a merging run, each base weight is its pristine value
    or, where updates were merged, exactly round(pristine + their sum)."""
    model = tiny_model("llama")
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    checked = []
    aggregate = HeteroSystem.aggregate

    def spy(self, ids=None, round=0):
        out = aggregate(self, ids, round)
        merged = 0
        for n, p in model.named_parameters():
            if ".lora_" in n:
                continue
            state = merge_state(p)
            key = n.replace(".base_layer", "")
            if state is None:
                assert torch.equal(p, pristine[key]), n
            else:
                merged += 1
                assert torch.equal(state.original, pristine[key])
                assert torch.equal(p, (pristine[key].float() + state.delta).to(p.dtype)), n
        checked.append(merged)
        return out

    monkeypatch.setattr(HeteroSystem, "aggregate", spy)
    train(config_for("hsplitlora"), model=model, tokenizer=tiny_tokenizer, write=False,
          show_progress=False)
    assert len(checked) == 2 and all(m > 0 for m in checked)  # 4 steps, I = 2
    for n, p in model.named_parameters():  # the run ends with the base as it was loaded
        if ".lora_" not in n:
            assert torch.equal(p, pristine[n.replace(".base_layer", "")]), n
