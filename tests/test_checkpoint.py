"""Checkpoints: atomic on disk, and a server restored from one steps on bit-identically."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from hsplitlora.checkpoint import atomic_save, load_checkpoint
from hsplitlora.models.lora import LoraSettings, attach_lora, lora_state
from hsplitlora.models.split import split_model
from hsplitlora.roles.server import MainServer
from hsplitlora.train.optim import OptimSettings
from tests.conftest import tiny_model
from tests.transport.live import activations


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"round": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"round": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"round": 1}
    assert os.listdir(tmp_path) == ["ck.pt"]  # no half-written leftovers either


def test_a_missing_checkpoint_says_what_to_check(tmp_path):
    with pytest.raises(FileNotFoundError, match="same output.dir and output.name"):
        load_checkpoint(tmp_path / "none.pt")


@pytest.mark.parametrize("per_client", [False, True])
def test_a_restored_server_continues_bit_identically(tmp_path, per_client):
    model = tiny_model("llama")
    torch.manual_seed(0)
    attach_lora(model, LoraSettings(r=4, alpha=8))
    _, segment = split_model(model, 2)
    optim = OptimSettings(lr=5e-3, total_steps=6, warmup_steps=1)

    def fresh():
        return MainServer(copy.deepcopy(segment), [0, 1], optim, per_client=per_client,
                          precision="fp32")

    a = fresh()
    for i in range(3):
        a.step(i % 2, activations(i))
    atomic_save(a.state_dict(), tmp_path / "server.pt")
    b = fresh()
    b.load_state_dict(load_checkpoint(tmp_path / "server.pt"))
    for i in range(3, 6):
        ra, rb = a.step(i % 2, activations(i)), b.step(i % 2, activations(i))
        assert ra.loss == rb.loss and torch.equal(ra.grad, rb.grad)
    for cid in (0, 1):
        sa, sb = lora_state(a.segments[cid]), lora_state(b.segments[cid])
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
