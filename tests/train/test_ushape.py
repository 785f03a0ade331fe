"""The U-shaped split in process: what crosses between a client and the main server."""

from __future__ import annotations

from typing import Any

import pytest
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


@pytest.mark.parametrize("mode", ["hsplitlora", "flexlora"])
def test_a_planned_u_shaped_run_plans_the_tail_and_sends_no_labels(tmp_path, tiny_tokenizer,
                                                                    mode):
    """HSplitLoRA (shared server side) and FlexLoRA (one per participant) with a tail of
    1 on the 4-block Llama: every planned cut leaves the server a block before the tail,
    the server is asked for the two U-shaped hops only, and the summary's plans count the
    tail's adapters as the client's."""
    from tests.train.test_hetero_modes import _cfg as hetero_cfg

    log: list[Any] = []
    placed: list[_Recording] = []

    def recording(p: Any) -> _Recording:
        placed.append(_Recording(p.device, log))
        return placed[-1]

    cfg = hetero_cfg(tmp_path, mode).model_copy(deep=True)
    cfg.train.tail, cfg.train.cut = 1, 1
    cfg = type(cfg).model_validate(cfg.model_dump())
    result = train(cfg, model=tiny_model("llama"), tokenizer=tiny_tokenizer, write=False,
                   show_progress=False, placement=recording)
    plans = next(r for r in result.records if r.get("event") == "plan")["plans"]
    assert all(1 <= p["cut"] <= 2 for p in plans)
    assert not [name for name, _, _ in log if name == "step"]
    hops = [(args, out) for name, args, out in log if name == "forward"]
    steps = [r for r in result.records if "event" not in r]
    assert len(hops) == len(steps) == 6 and all(acts.labels is None for (_, acts), _ in hops)
    segments = placed[0].server.segments.values()
    assert all(s.lm_head is None and max(s.block_range) <= 2 for s in segments)
    last = [r for r in result.records if r.get("event") in ("plan", "replan")][-1]["plans"]
    for entry, plan in zip(result.summary["plans"], last, strict=True):
        cut, ranks = plan["cut"], plan["ranks"]
        own = [m for m in ranks if int(m.split(".")[2]) < cut or ".layers.3." in m]
        assert entry["client_adapters"] == len(own)
    # the tail trained, on every client, and is in the exported adapter
    assert any(".layers.3." in k and "lora_B" in k and v.abs().max() > 0
               for k, v in result.adapter.items())
