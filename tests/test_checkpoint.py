"""Checkpoints: atomic on disk, and a server restored from one steps on bit-identically."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from hsplitlora.checkpoint import CheckpointError, atomic_save, load_checkpoint
from hsplitlora.models.lora import LoraSettings, attach_lora, lora_state
from hsplitlora.models.split import split_model
from hsplitlora.roles.server import MainServer
from hsplitlora.runtime.optim import OptimSettings
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


def _saved(tmp_path):
    path = tmp_path / "server.pt"
    atomic_save({"round": 3, "adapter": {"w": torch.arange(64, dtype=torch.float32)}}, path)
    return path


def test_a_flipped_bit_is_refused_naming_the_file(tmp_path):
    path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # one bit, somewhere in the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is truncated or corrupted"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0, 5, 30, 200, -1])
def test_a_truncated_or_empty_checkpoint_is_refused_naming_the_file(tmp_path, keep):
    path = _saved(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    with pytest.raises(CheckpointError, match=f"checkpoint {path} (is empty|is not an "
                                              "hsplitlora checkpoint|is truncated)"):
        load_checkpoint(path)


def test_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "server.pt"
    torch.save({"round": 1}, path)  # a plain torch file, no magic, no checksum
    with pytest.raises(CheckpointError, match="is not an hsplitlora checkpoint"):
        load_checkpoint(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_code_in_a_well_formed_checkpoint_is_never_run(tmp_path):
    path, marker = tmp_path / "server.pt", tmp_path / "pwned"
    atomic_save({"round": 1, "x": _Payload(marker)}, path)  # checksum and magic are right
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"holds an object of type posix.mkdir, which "
                                              "is not loaded"):
        load_checkpoint(path)
    assert not marker.exists()


def test_stale_temporary_files_of_dead_writers_are_cleaned_up(tmp_path):
    dead = tmp_path / ".server.pt.999999999.tmp"  # no such process
    alive = tmp_path / f".server.pt.{os.getppid()}.tmp"  # a writer still running
    dead.write_bytes(b"half")
    alive.write_bytes(b"half")
    _saved(tmp_path)
    assert not dead.exists() and alive.exists()


def test_a_checkpoint_holds_tensors_and_plain_data_exactly(tmp_path):
    state = {"round": 2, "trained": {0, 2}, "blob": b"\x00\x01", "t": (1, 2.5, None),
             "rng": torch.get_rng_state()}
    atomic_save(state, tmp_path / "ck.pt")
    back = load_checkpoint(tmp_path / "ck.pt")
    assert back["trained"] == {0, 2} and back["blob"] == b"\x00\x01"
    assert back["t"] == (1, 2.5, None) and torch.equal(back["rng"], state["rng"])
