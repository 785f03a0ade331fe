"""The main server role: the server segment(s), their adapters and optimizers."""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch

from hsplitlora.models.lora import (
    LoraSettings,
    load_lora_state,
    lora_parameters,
    lora_state,
    merge_base_update,
    restart_lora,
    tail_penalty,
)
from hsplitlora.models.shared import MergeState, adopt_merges, share_frozen
from hsplitlora.models.split import ServerSegment
from hsplitlora.roles.client import Update
from hsplitlora.roles.loss import segment_loss
from hsplitlora.roles.messages import Activations, ServerReply
from hsplitlora.runtime.compile import compiled_blocks
from hsplitlora.runtime.optim import Optimizer, OptimSettings, autocast

__all__ = ["MainServer"]


class MainServer:
    """Finishes each client's forward pass, computes the loss, returns dL/d(activations).

    In a U-shaped split the client keeps its tail and its labels: the server runs only
    the middle blocks (:meth:`forward`, :meth:`backward`) and never sees a label.

    ``per_client=False`` is SplitLoRA (SFL-V2): one server-side adapter, updated on every
    client's batch in turn. ``per_client=True`` is SplitFed (SFL-V1): one copy per client,
    trained in parallel and averaged by the fed server like the client side.
    """

    def __init__(
        self,
        segment: ServerSegment,
        client_ids: Iterable[int],
        optim: OptimSettings,
        *,
        per_client: bool = False,
        precision: str = "bf16",
        device: torch.device | str = "cpu",
        label_smoothing: float = 0.0,
        compile: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.precision = precision
        self.compile = compile
        self.label_smoothing = label_smoothing
        self.per_client = per_client
        # U-shaped split: each client's forward awaiting its tail's gradient
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        segment = segment.to(self.device)
        ids = list(client_ids)
        if per_client:
            # SFL-V1: each client's own adapters over the one shared frozen base
            self.segments = {cid: share_frozen(segment) for cid in ids}
            self.optimizers = {cid: Optimizer(lora_parameters(s), optim)
                               for cid, s in self.segments.items()}
        else:
            shared = Optimizer(lora_parameters(segment), optim)
            self.segments = {cid: segment for cid in ids}
            self.optimizers = {cid: shared for cid in ids}

    @classmethod
    def heterogeneous(
        cls, segments: Mapping[int, ServerSegment], optim: OptimSettings, *,
        shared: bool = False, **kwargs: object
    ) -> MainServer:
        """Client ``i`` is served by blocks ``[k_i, L)`` from its own cut (HSplitLoRA).
        Per participant: one server-side copy per client. ``shared``: the segments are
        views (:func:`~hsplitlora.models.split.server_view`) of one segment from the
        shallowest cut, whose adapters one optimizer updates on every client's batch."""
        first = next(iter(segments.values()))
        server = cls(first, [], optim, per_client=not shared, **kwargs)  # type: ignore[arg-type]
        server.segments = {cid: s.to(server.device) for cid, s in segments.items()}
        if shared:
            one = Optimizer(lora_parameters(_widest(server.segments.values())), optim)
            server.optimizers = dict.fromkeys(server.segments, one)
        else:
            server.optimizers = {cid: Optimizer(lora_parameters(s), optim)
                                 for cid, s in server.segments.items()}
        return server

    def cut(self, client_id: int) -> int:
        return self._segment(client_id).first_block

    def _groups(self) -> list[tuple[Optimizer, list[int]]]:
        """Clients by the optimizer (so the adapters) that serves them: one group under
        SFL-V2 or a shared heterogeneous side, one per client under SFL-V1."""
        groups: dict[int, tuple[Optimizer, list[int]]] = {}
        for cid, opt in self.optimizers.items():
            groups.setdefault(id(opt), (opt, []))[1].append(cid)
        return list(groups.values())

    def _widest(self, cids: Iterable[int]) -> ServerSegment:
        return _widest(self.segments[c] for c in cids)

    def replace_segment(self, client_id: int, segment: ServerSegment,
                        merges: Mapping[str, MergeState] | None = None) -> None:
        """Serve ``client_id`` from a new segment (its cut changed at a re-plan);
        ``merges``: what was merged into its weights, when it arrives from another process."""
        self.replace_segments({client_id: segment}, merges)

    def replace_segments(self, segments: Mapping[int, ServerSegment],
                         merges: Mapping[str, MergeState] | None = None) -> None:
        """:meth:`replace_segment` for several clients in one call, as a shared server
        side needs: its views must arrive together to stay views of one segment."""
        for cid, segment in segments.items():
            self.segments[cid] = segment.to(self.device)
        if merges:  # views share their modules with the widest segment, merge states too
            adopt_merges(self._widest(segments), merges)
        for opt, cids in self._groups():
            if any(c in segments for c in cids):
                opt.reset(lora_parameters(self._widest(cids)))

    def apply_update(self, updates: Mapping[str, Update],
                     settings: Mapping[int, LoraSettings], version: int,
                     keep: Collection[str] = ()) -> None:
        """Merge aggregation ``version``'s update into the base weights the server-side
        participants share (once: they share them) and restart each participant's
        adapters at the ranks planned for its client (those in ``settings``: a
        non-merging aggregation restarts only the participants it aggregated, before
        loading their new adapters). ``keep``: modules whose adapters, and their AdamW
        moments, go on as they are (a shared side's blocks that no client holds)."""
        for segment in self.segments.values():
            merge_base_update(segment, updates, version,
                              fan_in_fan_out=segment.spec.fan_in_fan_out)
        for opt, cids in self._groups():  # adapters shared by a group restart once
            restarted = [c for c in cids if c in settings]
            if restarted:
                widest = self._widest(cids)
                restart_lora(widest, settings[restarted[0]], keep)
                if keep:
                    opt.forget(lora_parameters(widest, skip=keep))
                else:
                    opt.reset(lora_parameters(widest))

    def _segment(self, client_id: int) -> ServerSegment:
        try:
            return self.segments[client_id]
        except KeyError:
            raise KeyError(f"main server: unknown client {client_id}") from None

    def step(self, client_id: int, acts: Activations) -> ServerReply:
        """Forward the server blocks on ``acts``, back-propagate, update, reply."""
        if acts.labels is None:
            raise ValueError(f"main server: client {client_id} kept its labels (a U-shaped "
                             "split): its step is forward() and backward(), not step()")
        segment = self._segment(client_id)
        loss, tokens, grad = segment_loss(
            segment, acts.hidden, acts.attention_mask, acts.labels, precision=self.precision,
            device=self.device, label_smoothing=self.label_smoothing, compile=self.compile)
        self._step(client_id, segment)
        return ServerReply(loss, tokens, grad)

    def forward(self, client_id: int, acts: Activations) -> torch.Tensor:
        """U-shaped split: run the middle blocks on ``acts`` and return the activations at
        the client's tail; :meth:`backward` finishes the step with the tail's gradient."""
        segment = self._segment(client_id)
        segment.train()
        hidden = acts.hidden.to(self.device).detach().requires_grad_(True)
        with autocast(self.precision, self.device), \
                compiled_blocks(segment.blocks, self.compile):
            out = segment(hidden, acts.attention_mask.to(self.device))
        self._pending[client_id] = (hidden, out)
        return out.detach()

    def backward(self, client_id: int, grad: torch.Tensor) -> torch.Tensor:
        """U-shaped split: back-propagate the tail's gradient through the middle blocks,
        update, and return dL/d(activations at the client's cut)."""
        try:
            hidden, out = self._pending.pop(client_id)
        except KeyError:
            raise RuntimeError(f"main server: backward for client {client_id} before its "
                               "forward") from None
        if grad.shape != out.shape:
            raise ValueError(f"main server: gradient shape {tuple(grad.shape)} from client "
                             f"{client_id} does not match its activations {tuple(out.shape)}")
        out.backward(grad.to(device=out.device, dtype=out.dtype))
        self._step(client_id, self._segment(client_id))
        assert hidden.grad is not None
        return hidden.grad

    def _step(self, client_id: int, segment: ServerSegment) -> None:
        s = self.optimizers[client_id].settings
        tail_penalty(segment, s.tail_gamma, s.tail_lambda)
        self.optimizers[client_id].step()

    @property
    def lr(self) -> float:
        return next(iter(self.optimizers.values())).lr

    def adapter_state(self, client_id: int | None = None) -> dict[str, torch.Tensor]:
        """The server-side adapter (of one client's copy under SFL-V1)."""
        if client_id is None:
            client_id = next(iter(self.segments))
        return lora_state(self._segment(client_id))

    def load_adapter_state(self, state: Mapping[str, torch.Tensor],
                           client_id: int | None = None) -> None:
        """Load an (aggregated) server-side adapter into every copy, or into one client's."""
        if client_id is not None:
            load_lora_state(self._segment(client_id), state)
            return
        for segment in {id(s): s for s in self.segments.values()}.values():
            load_lora_state(segment, state)

    def state_dict(self) -> dict[str, Any]:
        """Adapters and optimizer of every distinct server side (one under SFL-V2 and a
        shared heterogeneous side, one per client under SFL-V1), deep-copied so later
        steps cannot alter them, and this process's RNG (dropout)."""
        groups = [{"clients": cids, "adapter": lora_state(self._widest(cids)),
                   "optimizer": copy.deepcopy(opt.state_dict())}
                  for opt, cids in self._groups()]
        return {"groups": groups, "rng": torch.get_rng_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`, into segments built for the same plan."""
        for group in state["groups"]:
            load_lora_state(self._widest(group["clients"]), group["adapter"])
            self.optimizers[group["clients"][0]].load_state_dict(
                copy.deepcopy(group["optimizer"]))
        torch.set_rng_state(state["rng"])


def _widest(segments: Iterable[ServerSegment]) -> ServerSegment:
    """The segment from the shallowest cut: of views of one segment, that segment."""
    return min(segments, key=lambda s: s.first_block)
