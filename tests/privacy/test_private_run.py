"""A private SplitLoRA run: epsilon at delta in summary.json's fields and a metrics event,
equal to the accountant on the run's own counts; what reaches the server is clipped."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.privacy.accountant import epsilon
from hsplitlora.roles.server import MainServer
from hsplitlora.train.run import train
from tests.conftest import tiny_model
from tests.train.golden.runs import config_for


def test_private_splitlora_reports_epsilon_and_sends_clipped_noised_activations(
        tiny_tokenizer, monkeypatch):
    received = []
    step = MainServer.step

    def seen(self, client_id, acts):  # what arrives at the server, untouched
        received.append(acts.hidden.detach().clone())
        return step(self, client_id, acts)

    monkeypatch.setattr(MainServer, "step", seen)
    cfg = config_for("splitlora")  # 3 clients, 20 examples each, batch 2
    cfg.train = cfg.train.model_copy(update={"steps": 3})
    cfg.privacy = cfg.privacy.model_copy(update={
        "enabled": True, "activation_clip": 0.5, "activation_noise": 1.0,
        "adapter_clip": 0.05, "adapter_noise": 1.0, "delta": 1e-3})
    result = train(cfg, model=tiny_model("llama"), tokenizer=tiny_tokenizer, write=False,
                   show_progress=False)
    s = result.summary
    assert s["epsilon_activations"] == pytest.approx(epsilon(1.0, 2 / 20, 3, 1e-3))
    assert s["epsilon_adapter"] == pytest.approx(epsilon(1.0, 1.0, 2, 1e-3))  # rounds 2, 3
    assert s["privacy_delta"] == 1e-3
    (event,) = [r for r in result.records if r.get("event") == "privacy"]
    assert event["epsilon_activations"] == s["epsilon_activations"]
    assert len(received) == 9
    # noise of std 0.5 per coordinate on top of a norm-0.5 example: the norm is the noise's
    per_coord = torch.cat([h.flatten() for h in received]).std()
    assert float(per_coord) == pytest.approx(0.5, rel=0.05)


def test_a_resumed_private_run_draws_on_from_where_its_noise_stood(tmp_path, tiny_tokenizer,
                                                                    monkeypatch):
    """Stopped mid-interval (the update's reference and both noise streams in the
    checkpoint), resumed: the same losses and adapters as the uninterrupted run, which a
    noise stream restarted from its seed (a repeat of released noise) would break."""
    from tests.train.test_resume import _cfg, _run, killed_after_checkpoint, steps_of

    def cfg(where):
        c = _cfg(tmp_path / where, "splitlora", steps=2)  # stop mid-interval, then aggregate
        c.privacy = c.privacy.model_copy(update={
            "enabled": True, "activation_clip": 0.5, "activation_noise": 0.2,
            "adapter_clip": 0.05, "adapter_noise": 0.5, "delta": 1e-3})
        return c

    whole = _run(cfg("whole"), tiny_tokenizer)
    cut = cfg("cut")
    killed_after_checkpoint(monkeypatch, 0, lambda: _run(cut, tiny_tokenizer, checkpoint=True))
    resumed = _run(cut, tiny_tokenizer, checkpoint=True, resume=True)
    assert steps_of(resumed.records) == steps_of(whole.records)
    for name, value in whole.adapter.items():
        assert torch.equal(resumed.adapter[name], value), name
    assert resumed.summary["epsilon_activations"] == whole.summary["epsilon_activations"]
