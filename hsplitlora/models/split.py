"""Cut a decoder-only causal LM at a block boundary into a client and a server segment.

The cut must be *exact*: ``server(client(x))`` gives the unsplit model's logits. Rather
than re-implementing each architecture's forward (masks, rotary embeddings, position
ids differ per family and per transformers release), both segments run the model's own
code on a truncated block list:

* the client runs ``backbone(input_ids)`` over blocks ``[0, k)`` followed by a stop that
  raises with its input, so its output is exactly the input of block ``k``, whatever the
  backbone would do after its blocks (final norm, projections);
* the server runs ``backbone(inputs_embeds=h)`` over blocks ``[k, L)`` and a forward
  pre-hook on its first module swaps the received activations in as that module's input.
  Everything the backbone derives before its first block (causal mask, rotary tables,
  position embeddings) is therefore computed by transformers itself, and whatever the
  backbone does to ``inputs_embeds`` first (GPT-2 adds position embeddings, Gemma scales)
  is discarded, because the activations already contain it;
* the server's head runs the causal LM's own ``forward`` on the final hidden states, so
  what it does after the head (Gemma 2's logit soft-capping, Cohere's logit scale) is kept.

A U-shaped split (``train.tail``) cuts twice: the client keeps blocks ``[0, k)`` and the
tail ``[L - t, L)`` with the final norm and head; the server's middle segment runs blocks
``[k, L - t)`` and ends at a stop like the client's, so it returns the exact input of
block ``L - t``. The tail is a server segment starting at ``L - t`` that the client holds.

Per-layer facts the backbone reads by block index from its config (``layer_types``:
sliding vs full attention; per-layer rotary bases) are sliced to the segment's global
range, so local block ``i`` of a segment starting at ``k`` reads entry ``k + i``. Where the
parts live is found from the model (:mod:`hsplitlora.models.structure`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from hsplitlora.models.shared import shared_memo
from hsplitlora.models.structure import ArchSpec, SplitError, arch_spec, check_cut

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ClientSegment",
    "ServerSegment",
    "SplitError",
    "arch_spec",
    "num_blocks",
    "server_view",
    "split_model",
    "split_u",
]

# The architectures the unit tests pin down by hand; every other one is discovered and
# checked by the coverage sweep (docs/architectures.md).
ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


def num_blocks(config: Any) -> int:
    """Number of transformer blocks of a model config."""
    return int(getattr(config, arch_spec(config).n_layers))


def _check_cut(cut: int, n_blocks: int) -> None:
    if isinstance(cut, bool) or not isinstance(cut, int) or not 0 <= cut <= n_blocks:
        raise SplitError(
            f"cut {cut!r} is out of range: this model has {n_blocks} blocks, so the cut must "
            f"be an integer in [0, {n_blocks}] (blocks [0, cut) go to the client)."
        )


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class _Reached(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the client's stop with the input of the first block it does not hold."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class _Stop(nn.Module):
    """Stands where the client's blocks end; answers what the backbone asks of a block
    before calling it (``attention_type``) as the block it stands for would."""

    def __init__(self, stands_for: nn.Module | None) -> None:
        super().__init__()
        # a snapshot of the block's plain attributes, not the block: the stop must neither
        # hold nor copy it, and must pickle (Ray actors receive segments)
        for name, value in _plain_attributes(stands_for or nn.Module()).items():
            setattr(self, name, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise _Reached(args[0] if args else kwargs["hidden_states"])


class _Output:
    """What :class:`_Given` returns: the hidden states under every name a causal LM's
    forward reads them by (``[0]``, ``last_hidden_state``), ``None`` for everything else."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def __getitem__(self, index: int) -> torch.Tensor | None:
        return self.last_hidden_state if index == 0 else None

    def __getattr__(self, name: str) -> None:
        return None


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """The public attributes of ``module`` holding plain values (str, numbers, None)."""
    out = {}
    for name in dir(module):
        if name.startswith("_") or name == "training" or hasattr(nn.Module, name):
            continue
        try:
            value = getattr(module, name)
        except Exception:  # noqa: BLE001 - a property that needs a forward first
            continue
        if isinstance(value, (str, int, float, bool, type(None))):
            out[name] = value
    return out


class _Given(nn.Module):
    """Stands for the backbone inside the server's head: returns the hidden states it is
    given, so the causal LM's forward applies only its head and what follows it. It
    answers for the backbone's plain attributes (Falcon-H1's ``lm_head_multiplier``) and
    stands in for its sub-modules too (OPT's causal LM calls ``self.model.decoder``)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        for name, value in _plain_attributes(backbone).items():
            setattr(self, name, value)
        self._children = frozenset(name for name, _ in backbone.named_children())

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name not in self.__dict__.get("_children", ()):
                raise
            return self

    def forward(self, *args: Any, **kwargs: Any) -> _Output:
        assert self.hidden is not None
        return _Output(self.hidden)


class _Head(nn.Module):
    """The LM head as the causal LM applies it (soft-capping, logit scales included).

    It registers the head's own parameters under the head's names (``lm_head.weight``),
    shared with the causal LM shell it runs, so state-dict keys and tying are unchanged.
    Accepts ``[b, s, d]`` or ``[n, d]`` hidden states, as the training loop passes them.
    """

    def __init__(self, shell: nn.Module, spec: ArchSpec) -> None:
        super().__init__()
        head = getattr(shell, spec.head)
        for name, p in head.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, child in head.named_children():
            self.add_module(name, child)
        self._shell = (shell,)
        self._given = getattr(shell, spec.backbone)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.dim() == 2
        self._given.hidden = hidden.unsqueeze(1) if flat else hidden
        try:
            logits = self._shell[0](inputs_embeds=self._given.hidden).logits
        finally:
            self._given.hidden = None
        return logits.squeeze(1) if flat else logits


class _Segment(nn.Module):
    """A truncated backbone that remembers which global blocks it holds.

    Parameter names inside a segment are local (``backbone.layers.0...``); adapters cross
    role boundaries under the unsplit model's names (``model.layers.3...``) so that every
    party, the aggregator and the PEFT export agree on what a tensor is.
    """

    def __init__(self, backbone: nn.Module, spec: ArchSpec, first_block: int,
                 n_blocks: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.first_block = first_block
        self._n_blocks = n_blocks
        self._local = re.compile(rf"^backbone\.{re.escape(spec.blocks)}\.(\d+)\.")
        self._global = re.compile(
            rf"^{re.escape(spec.backbone)}\.{re.escape(spec.blocks)}\.(\d+)\."
        )

    @property
    def blocks(self) -> nn.ModuleList:
        """The blocks this segment holds (the client's stop is not one)."""
        held = cast(nn.ModuleList, self.backbone.get_submodule(self.spec.blocks))
        return cast(nn.ModuleList, held[: self._n_blocks])

    @property
    def block_range(self) -> range:
        """Global indices of the blocks this segment holds."""
        return range(self.first_block, self.first_block + self._n_blocks)

    def full_name(self, local: str) -> str:
        """Map a local parameter/module name to the unsplit model's name."""
        m = self._local.match(local)
        if m:
            index = int(m.group(1)) + self.first_block
            return f"{self.spec.backbone}.{self.spec.blocks}.{index}.{local[m.end():]}"
        if local.startswith("backbone."):
            return self.spec.backbone + local[len("backbone") :]
        return local

    def local_name(self, full: str) -> str:
        """Inverse of :meth:`full_name`; a name this segment does not hold raises KeyError."""
        m = self._global.match(full)
        if m:
            index = int(m.group(1)) - self.first_block
            if index not in range(self._n_blocks):
                raise KeyError(f"{full} is in block {m.group(1)}, not held by this segment")
            return f"backbone.{self.spec.blocks}.{index}.{full[m.end():]}"
        if full.startswith(self.spec.backbone + "."):
            return "backbone" + full[len(self.spec.backbone) :]
        return full

    def named_full_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            yield self.full_name(name), p


class ClientSegment(_Segment):
    """Embeddings and blocks ``[0, k)``: what a client device runs."""

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The activations at the cut; ``inputs_embeds`` (instead of ``input_ids``) lets
        an inversion attack differentiate through the segment w.r.t. its input."""
        try:
            self.backbone(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
        except _Reached as reached:
            return reached.hidden
        raise SplitError(
            f"{self.spec.model_type}: the backbone returned without running block "
            f"{self._n_blocks}, so its blocks do not run in order from "
            f"{self.spec.backbone}.{self.spec.blocks}; this model cannot be split."
        )


class _SwapIn:
    """The forward pre-hook on a server segment's first block: replaces whatever the
    backbone computed from ``inputs_embeds`` with the activations the client sent, which
    already are that block's exact input.

    It holds the activations itself, so the segment refers to it and not the other way
    round: a bound method of the segment as the hook would close a segment -> block ->
    hook -> segment cycle, and every discarded segment (its adapters included) would wait
    for the cyclic collector, which runs rarely; a hundred clients building their server
    halves then held a hundred sets of server-side adapters (docs/engine.md)."""

    def __init__(self) -> None:
        self.incoming: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.incoming is None:
            return args, kwargs
        if args:
            return (self.incoming, *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: self.incoming}


class ServerSegment(_Segment):
    """Blocks ``[k, L)``, the final norm and the LM head: what the main server runs.

    Without a head it is the middle of a U-shaped split: blocks ``[k, L - t)`` followed by
    a stop, returning the input of block ``L - t`` (the client's tail runs the rest).
    """

    def __init__(self, backbone: nn.Module, lm_head: nn.Module | None, spec: ArchSpec,
                 first_block: int, n_blocks: int, after_blocks: str | None = None) -> None:
        super().__init__(backbone, spec, first_block, n_blocks)
        self.lm_head = lm_head
        self._swap_in = _SwapIn()
        self._passthrough = False
        if n_blocks:
            entry: nn.Module | None = self.blocks[0]
        else:  # cut L: the activations go where the last block's output goes
            entry = backbone.get_submodule(after_blocks) if after_blocks else None
            self._passthrough = entry is None
        if entry is not None:
            entry.register_forward_pre_hook(self._swap_in, with_kwargs=True)

    def hidden(
        self,
        activations: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (after the final norm) for received activations; for a
        middle segment, the input of the first block after it."""
        if self._passthrough:  # cut L of a backbone with nothing after its blocks
            return activations
        self._swap_in.incoming = activations
        # hyper-connections: the activations are [b, s, streams, d] and the backbone takes
        # [b, s, d] embeddings (for the mask and rotary tables) before widening them
        embeds = activations[:, :, 0] if self.spec.streams > 1 else activations
        try:
            out = self.backbone(
                # a copy: some backbones scale inputs_embeds in place (CTRL), and whatever
                # they compute from it is replaced by the activations at the first block
                inputs_embeds=embeds.detach().clone(),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
        except _Reached as reached:  # a middle segment's stop
            return reached.hidden
        finally:
            self._swap_in.incoming = None
        return out.last_hidden_state

    def forward(
        self,
        activations: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits, or for a middle segment the activations at its end."""
        hidden = self.hidden(activations, attention_mask, position_ids)
        return hidden if self.lm_head is None else self.lm_head(hidden)


def _per_layer(config: Any, n: int) -> list[str]:
    """Config fields holding one entry per block (``layer_types``, per-layer rotary bases)."""
    out = []
    for name, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == n and not name.startswith("_"):
            out.append(name)
    return out


def _segment_config(config: Any, spec: ArchSpec, start: int, stop: int, slots: int) -> Any:
    """A copy of ``config`` for a segment holding global blocks ``[start, stop)`` in
    ``slots`` list entries (the client's stop takes one more, reading entry ``stop``)."""
    n = int(getattr(config, spec.n_layers))
    cfg = copy.deepcopy(config)
    for name in _per_layer(config, n):
        values = list(getattr(config, name))
        sliced = values[start:start + slots]
        sliced += sliced[-1:] * (slots - len(sliced))  # the stop after the last block
        setattr(cfg, name, type(getattr(config, name))(sliced))
    setattr(cfg, spec.n_layers, slots)
    return cfg


def _copy_backbone(
    backbone: nn.Module, spec: ArchSpec, blocks: list[nn.Module], extra: nn.Module | None,
    *, share_blocks: bool = False,
) -> tuple[nn.Module, nn.Module | None]:
    """Copy the backbone's structure with only ``blocks`` in it (and ``extra`` in the same
    call), over the same frozen tensors (:func:`~hsplitlora.models.shared.shared_memo`);
    ``share_blocks``: the very block modules, adapters and all, rather than copies.

    The original block list is swapped out during the copy so the blocks a segment does
    not hold are not even visited; copying ``extra`` (the head's causal LM shell) in the
    same call keeps a tied embedding tied.
    """
    original = backbone.get_submodule(spec.blocks)
    _set_path(backbone, spec.blocks, nn.ModuleList(blocks))
    try:
        memo = shared_memo(backbone)
        if share_blocks:
            memo.update({id(b): b for b in blocks})
        if extra is not None:
            memo.update(shared_memo(extra))
        shell, head = copy.deepcopy((backbone, extra), memo)
    finally:
        _set_path(backbone, spec.blocks, original)
    return shell, head


def _head_shell(model: nn.Module, spec: ArchSpec) -> nn.Module:
    """The causal LM with its backbone replaced by a :class:`_Given` (not copied yet)."""
    shell = copy.copy(model)
    shell._modules = dict(model._modules)
    shell._modules[spec.backbone] = _Given(getattr(model, spec.backbone))
    return shell


def _after_blocks(model: nn.Module, spec: ArchSpec) -> str | None:
    """The backbone module the last block's output goes to first (the final norm, where
    there is one), found by running the backbone on two tokens: names cannot tell a final
    norm from an embedding norm beside it (BlenderbotSmall vs LFM2). ``None``: the output
    is the backbone's result as it is."""
    backbone = getattr(model, spec.backbone)
    blocks = backbone.get_submodule(spec.blocks)
    if not len(blocks):
        return spec.final_norm
    seen: dict[str, Any] = {}

    def last_done(module: nn.Module, args: Any, output: Any) -> None:
        seen["out"] = output if isinstance(output, torch.Tensor) else output[0]

    def watch(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if "out" in seen and "entry" not in seen and x is seen["out"]:
                seen["entry"] = name
        return hook

    inside = spec.blocks + "."
    handles = [blocks[-1].register_forward_hook(last_done)]
    handles += [m.register_forward_pre_hook(watch(name), with_kwargs=True)
                for name, m in backbone.named_modules()
                if name and name != spec.blocks and not name.startswith(inside)]
    device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            backbone(input_ids=torch.tensor([[1, 2]], device=device), use_cache=False)
    except Exception:  # noqa: BLE001 - a backbone that will not run here: trust the names
        return spec.final_norm
    finally:
        for handle in handles:
            handle.remove()
    return seen.get("entry")


def server_view(segment: ServerSegment, cut: int) -> ServerSegment:
    """Blocks ``[cut, L)`` of ``segment`` (which starts at or before ``cut``) as a server
    segment of their own over the very same modules: training through the view trains
    ``segment``'s adapters. A shared server side serves each client from its own cut
    this way (one adapter per block, whichever clients reach it). The view of a U-shaped
    split's middle ends at the middle's own stop."""
    offset, n = cut - segment.first_block, len(segment.blocks)
    if not 0 <= offset < n:
        raise ValueError(f"a view of the server segment of blocks {segment.first_block}.."
                         f"{segment.first_block + n - 1} must start in it, not at {cut}")
    if offset == 0:
        return segment
    spec, backbone = segment.spec, segment.backbone
    middle = segment.lm_head is None  # its module list holds the stop after its blocks
    held = list(cast(nn.ModuleList, backbone.get_submodule(spec.blocks)))
    view, _ = _copy_backbone(backbone, spec, held[offset:] if middle else held[offset:n],
                             None, share_blocks=True)
    view.config = _segment_config(backbone.config, spec, offset, n, n - offset + middle)
    return ServerSegment(view, segment.lm_head, spec, cut, n - offset)


def _client_segment(backbone: nn.Module, spec: ArchSpec, blocks: list[nn.Module],
                    cut: int) -> ClientSegment:
    """Embeddings and blocks ``[0, cut)``, ending at a stop."""
    client_bb, _ = _copy_backbone(backbone, spec, blocks[:cut], None)
    _append_stop(client_bb, spec, blocks, cut)
    client_bb.config = _segment_config(backbone.config, spec, 0, cut, cut + 1)
    return ClientSegment(client_bb, spec, 0, cut)


def _append_stop(copied: nn.Module, spec: ArchSpec, blocks: list[nn.Module], at: int) -> None:
    """End a copied backbone at block ``at`` (which it does not hold)."""
    stop = _Stop(blocks[min(at, len(blocks) - 1)] if blocks else None)
    cast(nn.ModuleList, copied.get_submodule(spec.blocks)).append(stop)


def _server_segment(model: nn.Module, spec: ArchSpec, blocks: list[nn.Module], start: int,
                    stop: int) -> ServerSegment:
    """Blocks ``[start, stop)``: with the final norm and head when ``stop`` is the last
    block's end, else ending at a stop (the middle of a U-shaped split)."""
    n = len(blocks)
    backbone = getattr(model, spec.backbone)
    if stop < n:
        middle, _ = _copy_backbone(backbone, spec, blocks[start:stop], None)
        _append_stop(middle, spec, blocks, stop)
        middle.config = _segment_config(backbone.config, spec, start, stop, stop - start + 1)
        return ServerSegment(middle, None, spec, start, stop - start)
    server_bb, shell = _copy_backbone(backbone, spec, blocks[start:], _head_shell(model, spec))
    server_bb.config = _segment_config(backbone.config, spec, start, n, n - start)
    assert shell is not None
    after = _after_blocks(model, spec) if start == n else None
    return ServerSegment(server_bb, _Head(shell, spec), spec, start, n - start, after)


def _blocks_checked(model: nn.Module, spec: ArchSpec, *cuts: int) -> list[nn.Module]:
    blocks = list(getattr(model, spec.backbone).get_submodule(spec.blocks))
    for cut in cuts:
        _check_cut(cut, len(blocks))
        check_cut(model.config, spec, cut)
    return blocks


def split_model(model: nn.Module, cut: int) -> tuple[ClientSegment, ServerSegment]:
    """Split a causal LM (optionally already carrying LoRA) after block ``cut``.

    The original model is left untouched; the segments hold copies of its structure and
    LoRA parameters (so adapters attached before splitting start identical on both sides
    of any cut) over the very same frozen tensors, which nothing but a merge may write.
    """
    spec = arch_spec(model)
    blocks = _blocks_checked(model, spec, cut)
    backbone = getattr(model, spec.backbone)
    return (_client_segment(backbone, spec, blocks, cut),
            _server_segment(model, spec, blocks, cut, len(blocks)))


def split_u(model: nn.Module, cut: int,
            tail: int) -> tuple[ClientSegment, ServerSegment, ServerSegment]:
    """A U-shaped split: the client's head (blocks ``[0, cut)``), the server's middle
    (blocks ``[cut, L - tail)``, ending at a stop) and the client's tail (blocks
    ``[L - tail, L)``, final norm, LM head), as :func:`split_model` copies them."""
    spec = arch_spec(model)
    n = int(getattr(model.config, spec.n_layers))
    if isinstance(tail, bool) or not isinstance(tail, int) or not 0 < tail < n - cut:
        raise SplitError(
            f"tail {tail!r} with cut {cut!r} leaves no block to the server: this model has "
            f"{n} blocks, so the tail must be an integer in [1, {n - cut - 1}] (blocks "
            f"[cut, {n} - tail) run on the server)."
        )
    stop = n - tail
    blocks = _blocks_checked(model, spec, cut, stop)
    backbone = getattr(model, spec.backbone)
    return (_client_segment(backbone, spec, blocks, cut),
            _server_segment(model, spec, blocks, cut, stop),
            _server_segment(model, spec, blocks, stop, n))
