"""Cut a decoder-only causal LM at a block boundary into a client and a server segment.

The cut must be *exact*: ``server(client(x))`` gives the unsplit model's logits. Rather
than re-implementing each architecture's forward (masks, rotary embeddings, position
ids differ per family and per transformers release), both segments run the model's own
backbone forward on a truncated block list:

* the client runs ``backbone(input_ids)`` over blocks ``[0, k)`` with the final norm
  replaced by an identity, so its output is exactly the input of block ``k``;
* the server runs ``backbone(inputs_embeds=h)`` over blocks ``[k, L)`` and a forward
  pre-hook on its first module swaps the received activations in as that module's input.
  Everything the backbone derives before its first block (causal mask, rotary tables,
  position embeddings) is therefore computed by transformers itself, and whatever the
  backbone does to ``inputs_embeds`` first (GPT-2 adds position embeddings, Gemma scales)
  is discarded, because the activations already contain it.

All that differs between architectures is where things live, which is one row of
:data:`ARCHITECTURES`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hsplitlora.errors import UserError
from hsplitlora.models.shared import shared_memo

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ClientSegment",
    "ServerSegment",
    "SplitError",
    "arch_spec",
    "num_blocks",
    "split_model",
]


class SplitError(UserError, ValueError):
    """A model cannot be split as asked (unknown architecture, bad cut)."""


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one architecture family live inside a ``*ForCausalLM`` model."""

    backbone: str  # attribute of the causal LM holding the decoder stack
    blocks: str  # attribute of the backbone holding the block ModuleList
    final_norm: str  # attribute of the backbone holding the final norm
    n_layers: str  # config field with the number of blocks
    targets: tuple[str, ...]  # targetable linear layers inside a block, in block order
    default_targets: tuple[str, ...]  # what SplitLoRA adapts: the query and value projections
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores weights as (in, out)

    def block_of(self, name: str) -> int:
        """Index of the block holding ``name``, a module or parameter name of the unsplit
        model (``model.layers.3.mlp.up_proj`` -> 3)."""
        prefix = f"{self.backbone}.{self.blocks}."
        if not name.startswith(prefix):
            raise ValueError(f"{name!r} is not inside a block (names start {prefix}<i>.)")
        return int(name[len(prefix):].split(".")[0])


_LLAMA_LIKE = ArchSpec(
    backbone="model",
    blocks="layers",
    final_norm="norm",
    n_layers="num_hidden_layers",
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    default_targets=("q_proj", "v_proj"),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        backbone="transformer",
        blocks="h",
        final_norm="ln_f",
        n_layers="n_layer",
        targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        # GPT-2 fuses q, k, v into c_attn; peft adapts the fused matrix as one.
        default_targets=("attn.c_attn",),
        fan_in_fan_out=True,
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
}


def arch_spec(config: Any) -> ArchSpec:
    """The :class:`ArchSpec` for a transformers config, or a clear error."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise SplitError(
            f"cannot split architecture {model_type!r}: supported are "
            f"{', '.join(sorted(ARCHITECTURES))}. To add one, give its block list, final "
            "norm and layer-count field a row in hsplitlora.models.split.ARCHITECTURES."
        )
    return ARCHITECTURES[model_type]


def num_blocks(config: Any) -> int:
    """Number of transformer blocks of a model config."""
    return int(getattr(config, arch_spec(config).n_layers))


def _check_cut(cut: int, n_blocks: int) -> None:
    if isinstance(cut, bool) or not isinstance(cut, int) or not 0 <= cut <= n_blocks:
        raise SplitError(
            f"cut {cut!r} is out of range: this model has {n_blocks} blocks, so the cut must "
            f"be an integer in [0, {n_blocks}] (blocks [0, cut) go to the client)."
        )


class _Segment(nn.Module):
    """A truncated backbone that remembers which global blocks it holds.

    Parameter names inside a segment are local (``backbone.layers.0...``); adapters cross
    role boundaries under the unsplit model's names (``model.layers.3...``) so that every
    party, the aggregator and the PEFT export agree on what a tensor is.
    """

    def __init__(self, backbone: nn.Module, spec: ArchSpec, first_block: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.first_block = first_block
        self._local = re.compile(rf"^backbone\.{re.escape(spec.blocks)}\.(\d+)\.")
        self._global = re.compile(
            rf"^{re.escape(spec.backbone)}\.{re.escape(spec.blocks)}\.(\d+)\."
        )

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self.backbone, self.spec.blocks)

    @property
    def block_range(self) -> range:
        """Global indices of the blocks this segment holds."""
        return range(self.first_block, self.first_block + len(self.blocks))

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
            if index not in range(len(self.blocks)):
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
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state


class ServerSegment(_Segment):
    """Blocks ``[k, L)``, the final norm and the LM head: what the main server runs."""

    def __init__(
        self, backbone: nn.Module, lm_head: nn.Module, spec: ArchSpec, first_block: int
    ) -> None:
        super().__init__(backbone, spec, first_block)
        self.lm_head = lm_head
        self._incoming: torch.Tensor | None = None
        entry = self.blocks[0] if len(self.blocks) else getattr(backbone, spec.final_norm)
        entry.register_forward_pre_hook(self._swap_in, with_kwargs=True)

    def _swap_in(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # Replace whatever the backbone computed from inputs_embeds with the activations
        # the client sent: they already are the exact input of this block.
        if self._incoming is None:
            return args, kwargs
        if args:
            args = (self._incoming, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": self._incoming}
        return args, kwargs

    def hidden(
        self,
        activations: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (after the final norm) for received activations."""
        self._incoming = activations
        try:
            out = self.backbone(
                inputs_embeds=activations,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
        finally:
            self._incoming = None
        return out.last_hidden_state

    def forward(
        self,
        activations: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.lm_head(self.hidden(activations, attention_mask, position_ids))


def _copy_backbone(
    backbone: nn.Module, spec: ArchSpec, blocks: list[nn.Module], extra: nn.Module | None
) -> tuple[nn.Module, nn.Module | None]:
    """Copy the backbone's structure with only ``blocks`` in it (and ``extra`` in the same
    call), over the same frozen tensors (:func:`~hsplitlora.models.shared.shared_memo`).

    The original block list is swapped out during the copy so the blocks a segment does
    not hold are not even visited; copying ``extra`` (the LM head) in the same call keeps
    a tied embedding tied.
    """
    original = getattr(backbone, spec.blocks)
    setattr(backbone, spec.blocks, nn.ModuleList(blocks))
    try:
        memo = shared_memo(backbone)
        if extra is not None:
            memo.update(shared_memo(extra))
        shell, head = copy.deepcopy((backbone, extra), memo)
    finally:
        setattr(backbone, spec.blocks, original)
    cfg = copy.deepcopy(backbone.config)
    setattr(cfg, spec.n_layers, len(blocks))
    shell.config = cfg
    return shell, head


def split_model(model: nn.Module, cut: int) -> tuple[ClientSegment, ServerSegment]:
    """Split a causal LM (optionally already carrying LoRA) after block ``cut``.

    The original model is left untouched; the segments hold copies of its structure and
    LoRA parameters (so adapters attached before splitting start identical on both sides
    of any cut) over the very same frozen tensors, which nothing but a merge may write.
    """
    spec = arch_spec(model.config)
    backbone = getattr(model, spec.backbone)
    blocks = list(getattr(backbone, spec.blocks))
    _check_cut(cut, len(blocks))
    client_bb, _ = _copy_backbone(backbone, spec, blocks[:cut], None)
    setattr(client_bb, spec.final_norm, nn.Identity())
    server_bb, head = _copy_backbone(backbone, spec, blocks[cut:], model.get_output_embeddings())
    assert head is not None
    return ClientSegment(client_bb, spec, 0), ServerSegment(server_bb, head, spec, cut)
