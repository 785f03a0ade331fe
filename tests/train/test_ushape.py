"""The U-shaped split in process: what crosses between a client and the main server."""

from __future__ import annotations

from typing import Any

import torch

from hsplitlora.roles.messages import Activations, ServerReply
from hsplitlora.train.placement import InProcess
from hsplitlora.train.run import train
from tests.conftest import tiny_model
from tests.train.test_modes import _cfg


class _Recorded:
    """The real main server, with every call that crosses to it and its answer kept."""

    def __init__(self, server: Any, log: list[tuple[str, tuple[Any, ...], Any]]) -> None:
        self._server, self._log = server, log

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._server, name)
        if not callable(attr):
            return attr

        def call(*args: Any) -> Any:
            out = attr(*args)
            self._log.append((name, args, out))
            return out
        return call


class _Recording(InProcess):
    def __init__(self, device: torch.device, log: list[Any]) -> None:
        super().__init__(device)
        self.log = log

    def place(self, recipe: Any, kind: str) -> Any:
        role = recipe.build(self.device)
        if kind != "server":
            return role
        self.server = role
        return _Recorded(role, self.log)


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Activations | ServerReply):
        return [t for t in vars(x).values() if isinstance(t, torch.Tensor)]
    if isinstance(x, tuple | list):
        return [t for v in x for t in _tensors(v)]
    return []


def test_u_shaped_messages_carry_no_labels_and_are_counted(tiny_tokenizer):
    log: list[Any] = []
    placed: list[_Recording] = []

    def recording(p: Any) -> _Recording:
        placed.append(_Recording(p.device, log))
        return placed[-1]

    cfg = _cfg(mode="splitfed", num_clients=2, cut=1, tail=2, steps=2, agg_interval=2)
    result = train(cfg, model=tiny_model("llama"), tokenizer=tiny_tokenizer, write=False,
                   show_progress=False, placement=recording)
    steps = [r for r in result.records if "event" not in r]
    hops = [(name, args, out) for name, args, out in log if name in ("forward", "backward")]
    # two hops per step, and never the labelled step
    assert [name for name, _, _ in hops] == ["forward", "backward"] * len(steps) == \
        ["forward", "backward"] * 4
    assert not [name for name, _, _ in log if name == "step"]
    for (_, (cid, acts), returned), (_, (cid2, tail_grad), cut_grad), step in zip(
            hops[::2], hops[1::2], steps, strict=True):
        assert cid == cid2 == step["client"]
        assert acts.labels is None
        # what crosses: float activations and gradients, and the 0/1 attention mask
        for t in _tensors((acts, returned, tail_grad, cut_grad)):
            assert t.is_floating_point() or t is acts.attention_mask
        assert set(acts.attention_mask.unique().tolist()) <= {0, 1}
        b, s = acts.attention_mask.shape
        assert acts.hidden.shape == returned.shape == tail_grad.shape == cut_grad.shape == \
            (b, s, 32)
        # up: activations + mask, the tail's gradient; down: the activations at L - t, the
        # gradient at the cut (fp32, int64 mask)
        assert step["bytes_up"] == b * s * 32 * 4 + b * s * 8 + b * s * 32 * 4
        assert step["bytes_down"] == 2 * b * s * 32 * 4
        assert step["loss"] > 0
    # the client's tail (blocks 2, 3) trained and is in the result; the server holds no head
    assert any(".layers.3." in k and "lora_B" in k and v.abs().max() > 0
               for k, v in result.adapter.items())
    segments = placed[0].server.segments.values()
    assert all(s.lm_head is None and list(s.block_range) == [1] for s in segments)
