"""One frozen base per process: parties share its weight tensors, merges apply once.

Every party of a run (each client, each server-side participant, each learner) holds its
own module tree and its own adapters, but the frozen tensors under them are the very
same objects as the process's base model: :func:`share_frozen` copies a module's
structure and LoRA parameters while mapping every other parameter and buffer to itself.
A hundred simulated clients then cost a hundred adapters, not a hundred models.

Merging methods (noise-free aggregation, FLoRA's stacking) add an aggregated update to
the base weights. With shared tensors that must happen once per process, not once per
party, and in a bf16 base a small update added to the weight would round away. So each
merged weight keeps its state here, keyed by the tensor itself: the weight as loaded, the
sum of every update merged into it so far (fp32), and the version of the last merge. The
stored weight is always ``round(original + delta)``: exactly what a full-precision copy
cast to bf16 per matmul would give (what bf16 autocast does), at the cost of the adapted
matrices only (docs/engine.md). A merge tagged with a version the weight has seen is a
no-op, so every party of a process may apply the same aggregation.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

__all__ = ["MergeState", "added", "adopt_merges", "merge_into", "merge_state", "merge_states",
           "merged_delta", "restore_original", "set_delta", "share_frozen", "shared_memo"]

M = TypeVar("M", bound=nn.Module)


def _is_lora(name: str) -> bool:
    return ".lora_" in name


def shared_memo(module: nn.Module) -> dict[int, object]:
    """A :func:`copy.deepcopy` memo that maps every frozen parameter and every buffer of
    ``module`` to itself, so a copy made with it shares them (LoRA parameters are copied)."""
    memo: dict[int, object] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if not _is_lora(name):
            memo[id(p)] = p
    for b in module.buffers():
        memo[id(b)] = b
    return memo


def share_frozen(module: M) -> M:
    """A copy of ``module`` with its own structure and adapters over the same frozen
    tensors (same storage: nothing of the base is duplicated)."""
    return copy.deepcopy(module, shared_memo(module))


@dataclass
class MergeState:
    """What has been merged into one frozen weight in this process."""

    original: torch.Tensor  # the weight before any merge, in its storage dtype
    delta: torch.Tensor  # sum of the merged updates, fp32, in the weight's own layout
    version: int  # the last merge applied


class _Registry:
    """Merge states keyed by the weight tensor itself (by identity: a tensor's ``==`` is
    elementwise, so no dict or WeakKeyDictionary may compare keys), dropped with it."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[weakref.ref[torch.Tensor], MergeState]] = {}

    def get(self, weight: torch.Tensor) -> MergeState | None:
        entry = self._by_id.get(id(weight))
        return entry[1] if entry is not None and entry[0]() is weight else None

    def __setitem__(self, weight: torch.Tensor, state: MergeState) -> None:
        key = id(weight)
        if key not in self._by_id or self._by_id[key][0]() is not weight:
            weakref.finalize(weight, self._by_id.pop, key, None)
        self._by_id[key] = (weakref.ref(weight), state)

    def pop(self, weight: torch.Tensor) -> MergeState | None:
        state = self.get(weight)
        if state is not None:
            del self._by_id[id(weight)]
        return state


_STATES = _Registry()


def merge_state(weight: torch.Tensor) -> MergeState | None:
    """The merge state of ``weight`` (None: nothing was ever merged into it)."""
    return _STATES.get(weight)


def _state(weight: torch.Tensor) -> MergeState:
    state = _STATES.get(weight)
    if state is None:
        state = MergeState(weight.detach().clone(),
                           torch.zeros(weight.shape, dtype=torch.float32, device=weight.device),
                           0)
        _STATES[weight] = state
    return state


def _write(weight: torch.Tensor, state: MergeState) -> None:
    with torch.no_grad():
        weight.copy_((state.original.float() + state.delta).to(weight.dtype))


def merge_into(weight: torch.Tensor, update: torch.Tensor, version: int) -> bool:
    """Add ``update`` (fp32, the weight's layout) to ``weight`` unless merge ``version``
    was applied to it already; returns whether it was applied now."""
    state = _state(weight)
    if version <= state.version:
        return False
    if update.shape != weight.shape:
        raise ValueError(f"update of shape {tuple(update.shape)} does not fit weight of "
                         f"shape {tuple(weight.shape)}")
    state.delta += update.to(device=state.delta.device, dtype=torch.float32)
    state.version = version
    _write(weight, state)
    return True


def merged_delta(weight: torch.Tensor) -> torch.Tensor | None:
    """Everything merged into ``weight`` so far (fp32, its layout), or None."""
    state = _STATES.get(weight)
    return None if state is None else state.delta


def set_delta(weight: torch.Tensor, delta: torch.Tensor, version: int) -> None:
    """Make ``weight`` its original plus ``delta`` as of merge ``version``: how a party
    that did not hold this weight during earlier merges catches up (sent by the server)."""
    state = _state(weight)
    if delta.shape != weight.shape:
        raise ValueError(f"merged delta of shape {tuple(delta.shape)} does not fit weight of "
                         f"shape {tuple(weight.shape)}")
    state.delta = delta.to(device=weight.device, dtype=torch.float32).clone()
    state.version = version
    _write(weight, state)


@contextlib.contextmanager
def added(weights: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor]
          ) -> Iterator[None]:
    """For the duration, each weight named in ``deltas`` reads ``round(original + merged
    + delta)`` (fp32 deltas in the weight's layout): a global model of which a part is
    not merged (a shared server side's own blocks), for an evaluation. Afterwards every
    weight holds bit for bit what it held, merge states untouched."""
    saved = {}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                w = weights[name]
                saved[name] = w.detach().clone()
                state = _STATES.get(w)
                full = w.float() if state is None else state.original.float() + state.delta
                w.copy_((full + delta.to(full)).to(w.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, old in saved.items():
                weights[name].copy_(old)


def restore_original(weights: Mapping[str, torch.Tensor]) -> None:
    """Put each weight back as it was loaded and forget its merges."""
    with torch.no_grad():
        for w in weights.values():
            state = _STATES.pop(w)
            if state is not None:
                w.copy_(state.original)


def merge_states(module: nn.Module) -> dict[str, MergeState]:
    """The merge state of each of ``module``'s parameters that has one, by parameter
    name: what a copy of ``module`` in another process needs (:func:`adopt_merges`) to go
    on merging exactly as this one would."""
    return {name: state for name, p in module.named_parameters()
            if (state := _STATES.get(p)) is not None}


def adopt_merges(module: nn.Module, states: Mapping[str, MergeState]) -> None:
    """Give a copy of a merged module (arrived from another process, its weights already
    merged) the merge states of the module it copies, so later merges stay exact."""
    params = dict(module.named_parameters())
    for name, state in states.items():
        w = params[name]
        mine = MergeState(state.original.to(w.device).clone(), state.delta.to(w.device).clone(),
                          state.version)
        _STATES[w] = mine
        _write(w, mine)
