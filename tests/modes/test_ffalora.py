"""FFA-LoRA: A frozen at its one random initialisation, only B trained and averaged, so
the average of the clients' B A is exactly avg(B) A; only B travels."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.roles.fedserver import FedServer
from hsplitlora.train.run import train
from tests.conftest import tiny_model
from tests.train.golden.runs import config_for


def _cfg(**train):
    cfg = config_for("federated")
    return cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"mode": "ffalora", **train})})


def test_a_never_moves_and_the_average_is_exact(tiny_tokenizer, monkeypatch):
    from hsplitlora.train import run

    seen, init_a = [], {}
    aggregate = FedServer.aggregate

    def spy(self, states, num_samples):
        out = aggregate(self, states, num_samples)
        seen.append((states, num_samples, out))
        return out

    monkeypatch.setattr(FedServer, "aggregate", spy)
    prepare = run.prepare

    def initial(*args, **kwargs):  # the adapter prepare() attaches, before any training
        p = prepare(*args, **kwargs)
        init_a.update({n: x.detach().clone() for n, x in p.model.named_parameters()
                       if ".lora_A." in n})
        return p

    monkeypatch.setattr(run, "prepare", initial)
    cfg = _cfg()
    result = train(cfg, model=tiny_model("llama"), tokenizer=tiny_tokenizer, write=False,
                   show_progress=False)
    assert seen, "no aggregation ran"
    for states, n, out in seen:
        total = sum(n)
        for key in out:
            if ".lora_A." not in key:
                continue
            module = key.removesuffix(".lora_A.weight")
            b = f"{module}.lora_B.weight"
            assert all(torch.equal(s[key], out[key]) for s in states)  # one A for all
            want = sum(w / total * (s[b] @ s[key]) for s, w in zip(states, n, strict=True))
            torch.testing.assert_close(out[b] @ out[key], want, atol=1e-6, rtol=0)
    # A is still its initialisation, B trained
    for name, a in init_a.items():
        key = name.replace(".lora_A.default.weight", ".lora_A.weight")
        assert torch.equal(result.adapter[key], a), key
    assert any(v.abs().sum() > 0 for k, v in result.adapter.items() if ".lora_B." in k)
    assert init_a
    # only B travels
    aggs = [r for r in result.records if r.get("event") == "aggregate"]
    b_bytes = sum(v.numel() * 4 for k, v in result.adapter.items() if ".lora_B." in k)
    assert aggs and all(r["bytes_up"] == b_bytes * len(r["clients"]) for r in aggs)


def test_fed_server_refuses_frozen_factors_that_differ():
    fed = FedServer(parts=("B",))
    a = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(3, 2)}
    b = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.ones(3, 2)}
    with pytest.raises(ValueError, match="frozen, yet the clients' copies differ"):
        fed.aggregate([a, b], [1, 1])
    assert fed.uploaded(a) == {"m.lora_B.weight": a["m.lora_B.weight"]}
