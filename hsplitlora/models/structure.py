"""Find where the parts of a decoder-only causal LM live, from the model itself.

Every ``*ForCausalLM`` that transformers builds around one ``nn.ModuleList`` of decoder
blocks has the same shape: a backbone (``model.base_model_prefix``) that embeds the tokens,
runs the blocks and normalises, and a head (``get_output_embeddings()``). :func:`discover`
reads that shape off a model: the backbone, the block list (the one ``ModuleList`` with as
many entries as the config's layer count), the final norm, the layer-count field, the head,
and every linear layer inside the blocks with its shape, orientation, the activation it
reads and, for fused projections, its parts. :func:`arch_spec` does the same for a bare
config by building the model on the meta device (no memory, no weights).

The split (:mod:`hsplitlora.models.split`), LoRA (:mod:`hsplitlora.models.lora`), importance
scoring and the cost model all read this one :class:`ArchSpec`; :data:`OVERRIDES` holds
the few facts discovery cannot decide. Why each rule is what it is: ``docs/architectures.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from hsplitlora.errors import UserError

__all__ = [
    "OVERRIDES",
    "ArchSpec",
    "Matrix",
    "Part",
    "SplitError",
    "arch_spec",
    "check_cut",
    "client_blocks",
    "discover",
]


class SplitError(UserError, ValueError):
    """A model cannot be split as asked (unsupported architecture, bad cut)."""


@dataclass(frozen=True)
class Part:
    """A contiguous run of output rows of a fused matrix (GPT-2's ``c_attn`` -> q, k, v)."""

    label: str
    start: int
    stop: int

    @property
    def width(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Matrix:
    """One linear layer of a transformer block, as found in the model."""

    path: str  # module path inside the block: "self_attn.q_proj", "attn.c_attn"
    kind: str  # short label for tables: q, k, v, o, gate, up, down, qkv, or the layer's name
    d_out: int
    d_in: int
    reads: str  # the activation it reads (a _STAGES entry); adapters reading one share it
    bias: bool = False
    parts: tuple[Part, ...] = ()  # a fused projection's parts, in output-row order

    def lora_params(self, rank: int) -> int:
        return rank * (self.d_in + self.d_out)

    def part(self, label: str) -> Part:
        for p in self.parts:
            if p.label == label:
                return p
        raise KeyError(f"{self.path} has no part {label!r}; its parts are "
                       f"{[p.label for p in self.parts] or 'none (it is not fused)'}")


# The activations a block's matrices read, in the order the block computes them.
STAGES = ("attn_in", "attn_out", "mlp_in", "mlp_mid")


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one causal LM live, and what its blocks' linear layers are."""

    backbone: str  # attribute of the causal LM holding the decoder stack
    blocks: str  # path inside the backbone of the block ModuleList ("layers", "decoder.layers")
    final_norm: str | None  # backbone child applied after the blocks; None: there is none
    n_layers: str  # config field with the number of blocks
    targets: tuple[str, ...]  # targetable linear layers inside a block, in block order
    default_targets: tuple[str, ...]  # what SplitLoRA adapts: the query and value projections
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores weights as (in, out)
    model_type: str = ""
    head: str = "lm_head"  # attribute of the causal LM holding the output projection
    matrices: tuple[Matrix, ...] = ()  # every targetable linear, by block-relative path
    uniform: bool = True  # every block holds the same matrices with the same shapes
    shell_params: int = 0  # backbone parameters outside the blocks (embeddings, final norm)
    head_params: int = 0  # the head's own parameters (0 when tied to the embeddings)
    block_params: tuple[int, ...] = field(default=(), compare=False)  # per block
    final_norm_params: int = 0  # parameters of the final norm
    block_norms: tuple[str, ...] = ()  # norm-like modules of a block, by path
    norm: str = "rms"  # "layer" when the block norms are LayerNorms (weight and bias)
    positions: int = 0  # rows of a learned position embedding (GPT-2); 0: none (rotary)
    streams: int = 1  # residual streams crossing a cut: hyper-connections send [b, s, n, d]

    def block_of(self, name: str) -> int:
        """Index of the block holding ``name``, a module or parameter name of the unsplit
        model (``model.layers.3.mlp.up_proj`` -> 3)."""
        prefix = f"{self.backbone}.{self.blocks}."
        if not name.startswith(prefix):
            raise ValueError(f"{name!r} is not inside a block (names start {prefix}<i>.)")
        return int(name[len(prefix):].split(".")[0])

    @property
    def block_prefix(self) -> str:
        """``model.layers``: a block's modules are named ``f"{block_prefix}.{i}.{path}"``."""
        return f"{self.backbone}.{self.blocks}"

    def matrix(self, path: str) -> Matrix:
        for m in self.matrices:
            if m.path == path:
                return m
        raise KeyError(f"{path!r} is not a linear layer of a {self.model_type} block: "
                       f"{[m.path for m in self.matrices]}")


# Facts discovery cannot decide, per model_type. Keys are ArchSpec fields, plus "refuse":
# a reason the architecture cannot be split exactly (checked by the coverage sweep), and
# "refuse_if": (config field, reason), the same refusal only when that field is set.
_LOOPED = ("its blocks do not run once each, in list order (the backbone loops over a "
           "range of them)")
_DENSE = ("its blocks also read the states of earlier blocks, besides the hidden states, "
          "which the client would have to send too")
_NO_EMBEDS = ("its backbone cannot start from hidden states (inputs_embeds), so the server "
              "cannot run its blocks on received activations")
_DRAFTER = ("it is a speculative-decoding drafter: it runs on the target model's hidden "
            "states and KV states (shared_kv_states), not on token ids, and every block "
            "attends to the target model's KV states")
_PER_LAYER_INPUTS = ("its blocks read per-layer inputs computed from the token ids, which "
                     "only the client has")
OVERRIDES: dict[str, dict[str, Any]] = {
    # found by the coverage sweep (scripts/coverage_sweep.py), see docs/architectures.md
    "dory": {"refuse": _LOOPED},
    "inkling2_text": {"refuse": _DENSE},
    "inkling2_loop_text": {"refuse": _DENSE},
    "zaya": {"refuse": "its blocks pass router states from one block to the next besides "
                       "the hidden states, which the client would have to send too"},
    "cpmant": {"refuse": _NO_EMBEDS},
    "electra": {"refuse": "its embeddings project from embedding_size to the hidden size "
                          "before the blocks, and the backbone takes inputs_embeds before "
                          "that projection"},
    "gemma4_text": {"refuse": _PER_LAYER_INPUTS},
    "gemma3n_text": {"refuse": _PER_LAYER_INPUTS},
    "zamba": {"refuse": "its hybrid blocks call one shared transformer block at several "
                        "depths and feed it the embeddings' output, which only the client has"},
    "zamba2": {"refuse": "its hybrid blocks call shared transformer blocks at several depths "
                         "and feed them the embeddings' output, which only the client has"},
    "xlnet": {"refuse": "its blocks run two attention streams (content and query) and "
                        "relative position tensors that are not one hidden state"},
    "rembert": {"refuse": "its embeddings project from input_embedding_size to the hidden "
                          "size before the blocks, and the backbone takes inputs_embeds before "
                          "that projection"},
    "prophetnet": {"refuse": "its decoder is ProphetNet's n-gram stream decoder of an "
                             "encoder-decoder model"},
    "big_bird": {"refuse": "its backbone calls a method on every block of the list before "
                           "running them (set_attention_type), so a segment cannot end early"},
    "rwkv": {"refuse": "its backbone reaches into every block of the list (rescaling their "
                       "attention and feed-forward weights in eval mode), so a segment cannot "
                       "end early"},
    "qwen4_exp_text": {"refuse_if": ("ple_layer_ids", _PER_LAYER_INPUTS)},
    # hyper-connections split exactly (the streams cross the cut); these cuts do not
    "hy_v4": {"refuse_at": ("indexer_types", "shared", "first",
                            "its first server block reuses the previous block's indexer "
                            "top-k selection (a shared DSA layer), which the client would "
                            "have to send too")},
    "gemma4_assistant": {"refuse": _DRAFTER},
    "gemma4_unified_assistant": {"refuse": _DRAFTER},
    "deepseek_v4": {"refuse_at": ("mlp_layer_types", "hash_moe", "server",
                                  "its hash_moe layers pick experts by token id (a frozen "
                                  "token-to-expert table), and only the client has the "
                                  "token ids")},
}
# its config counts each block's two sub-layers in num_hidden_layers
OVERRIDES["longcat_flash"] = {"n_layers": "num_layers"}
# peft refuses LoRA on a Mamba mixer's out_proj (its fused kernels read the weight
# directly, so an adapter there would be skipped): not a target for these
for _mamba in ("falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"):
    OVERRIDES[_mamba] = {"exclude": ("out_proj",)}

# Block-relative layer names -> short kind labels (tables, default targets).
_KINDS = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "query": "q", "key": "k",
    "value": "v", "q": "q", "k": "k", "v": "v", "wq": "q", "wk": "k", "wv": "v",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "c_attn": "qkv",
    "qkv_proj": "qkv", "query_key_value": "qkv", "Wqkv": "qkv", "c_fc": "up",
    "gate_up_proj": "gate_up", "fc1": "up", "fc2": "down", "w1": "gate", "w3": "up",
    "w2": "down", "out_proj": "o", "dense": "o",
}
_ATTENTION = ("attn", "attention", "mixer")
_OUTPUTS = {"o_proj", "out_proj", "dense", "o", "wo", "c_proj", "output", "proj"}
_MLP_OUTPUTS = {"down_proj", "fc2", "w2", "c_proj", "dense_4h_to_h", "wo", "down", "proj",
                "output", "dense"}


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _fan_in_fan_out(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _base(module: nn.Module) -> nn.Module:
    """The layer under any peft wrapping."""
    base = getattr(module, "base_layer", None)
    while isinstance(base, nn.Module):
        module, base = base, getattr(base, "base_layer", None)
    return module


def _linears(block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Block-relative path and (base) layer of every linear in a block, peft-aware."""
    skip: list[str] = []
    for name, module in block.named_modules():
        if not name or any(name.startswith(s + ".") for s in skip):
            continue
        base = _base(module)
        if base is not module:  # a peft LoraLayer: report it as the layer it wraps
            skip.append(name)
        # a router that subclasses nn.Linear but returns (weights, experts) is no target:
        # an adapter adds to a tensor output
        router = type(base) is not nn.Linear and "router" in type(base).__name__.lower()
        if _is_linear(base) and not router and _acts_as_linear(base):
            yield name, base


def _acts_as_linear(layer: nn.Module) -> bool:
    """Whether an nn.Linear subclass with its own forward still maps ``[n, d_in]`` to
    ``[n, d_out]``: peft wraps it as a plain Linear and adds ``B A x`` to that output, so
    a per-group matmul (DeepSeek V4's ``o_a_proj``) must not be a target. A shape probe,
    which runs on the meta device too; FalconLinear passes."""
    if type(layer) is nn.Linear or type(layer).forward is nn.Linear.forward \
            or _fan_in_fan_out(layer):
        return True
    w = cast(torch.Tensor, layer.weight)
    d_out, d_in = int(w.shape[0]), int(w.shape[1])
    try:
        with torch.no_grad():
            out = layer(torch.zeros(1, d_in, device=w.device, dtype=w.dtype))
    except Exception:  # noqa: BLE001 - it does not take [n, d_in]: not a plain linear map
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (1, d_out)


def _layer_count(config: Any) -> tuple[str, int]:
    # decoder_layers first: BART-style *ForCausalLM is the decoder of an encoder-decoder,
    # whose num_hidden_layers means the encoder's
    for name in ("decoder_layers", "num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return name, value
    raise SplitError(
        f"cannot split architecture {getattr(config, 'model_type', '?')!r}: its config names no "
        "layer count (num_hidden_layers, n_layer, num_layers). Add its field as 'n_layers' in "
        "hsplitlora.models.structure.OVERRIDES."
    )


def _refuse(model_type: str, why: str, fix: str) -> SplitError:
    return SplitError(f"cannot split architecture {model_type!r} exactly: {why}. {fix}")


def _stage(path: str, tp_plan: dict[str, str]) -> str:
    """The activation a block's linear reads: the attention's or MLP's input, or the inner
    activation its output projection reads. The tensor-parallel plan says it when the
    config has one (row-wise layers read the inner activation); names say it otherwise."""
    parts = path.split(".")
    leaf = parts[-1]
    attention = any(a in p.lower() for p in parts[:-1] for a in _ATTENTION)
    plan = next((v for k, v in tp_plan.items() if k.split(".*.", 1)[-1] == path), None)
    if plan is not None:
        inner = plan.startswith("rowwise")
    else:
        inner = leaf in (_OUTPUTS if attention else _MLP_OUTPUTS)
    if attention:
        return "attn_out" if inner else "attn_in"
    return "mlp_mid" if inner else "mlp_in"


def _kind(path: str, stage: str) -> str:
    leaf = path.split(".")[-1]
    if leaf == "c_proj":
        return "o" if stage == "attn_out" else "down"
    if leaf == "dense" and not stage.startswith("attn"):
        return "down"
    return _KINDS.get(leaf, leaf)


def _parts(path: str, d_out: int, config: Any) -> tuple[Part, ...]:
    """The contiguous parts of a fused projection, from the config's head counts.

    Only layouts that concatenate whole projections along the output rows count:
    GPT-2's ``c_attn`` (q | k | v, d each), Phi-3's ``qkv_proj`` (q | k | v by head counts)
    and ``gate_up_proj`` (gate | up). Per-head interleaved layouts (GPT-NeoX's
    ``query_key_value``) are adapted as whole matrices.
    """
    leaf = path.split(".")[-1]
    if leaf == "gate_up_proj" and d_out % 2 == 0:
        half = d_out // 2
        return (Part("gate", 0, half), Part("up", half, d_out))
    if leaf not in ("c_attn", "qkv_proj"):
        return ()
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not heads or not hidden:
        return ()
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    q, k = heads * head_dim, kv * head_dim
    if q + 2 * k != d_out:
        return ()
    return (Part("q", 0, q), Part("k", q, q + k), Part("v", q + k, d_out))


def _unique_params(module: nn.Module, exclude: set[int] | None = None) -> int:
    seen = set(exclude or ())
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _block_list(backbone: nn.Module, n: int, model_type: str, pp_plan: dict[str, Any]
                ) -> str:
    """Path of the one ModuleList of ``n`` blocks in the backbone."""
    found = [name for name, m in backbone.named_modules()
             if name and isinstance(m, nn.ModuleList) and len(m) == n]
    found = [f for f in found if not any(f.startswith(o + ".") for o in found if o != f)]
    planned = [f for f in found if f in pp_plan]
    if len(planned) == 1:
        return planned[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise _refuse(model_type, f"its decoder blocks are not one nn.ModuleList of "
                      f"{n} modules (the config's layer count)",
                      "Only models whose blocks run one after another from a single list "
                      "can be cut between blocks.")
    raise _refuse(model_type, f"its backbone holds {len(found)} lists of {n} modules "
                  f"({', '.join(found)}), so the block list is ambiguous",
                  "Name the block list as 'blocks' in hsplitlora.models.structure.OVERRIDES.")


def _final_norm(backbone: nn.Module, blocks: str, pp_plan: dict[str, Any]) -> str | None:
    """The module the blocks' output goes through first: the pipeline plan's entry after
    the blocks when the config has one, else the last norm among the block list's siblings
    (OPT keeps it beside ``decoder.layers``; embedding norms live inside the embeddings)."""
    names = list(pp_plan)
    if blocks in names and names.index(blocks) + 1 < len(names):
        return names[names.index(blocks) + 1]
    parent, _, leaf = blocks.rpartition(".")
    levels = [parent] + ([""] if parent else [])  # beside the block list, then the backbone
    for level in levels:
        holder = backbone.get_submodule(level) if level else backbone
        norms = [n for n, m in holder.named_children()
                 if n not in (leaf, level.split(".")[0])
                 and ("norm" in type(m).__name__.lower() or "norm" in n.lower()
                      or n.lower().startswith("ln"))]
        # an embedding norm among them runs before the blocks, unless it is the only
        # norm (LFM2 calls its final norm embedding_norm)
        final = [n for n in norms if "emb" not in n.lower()] or norms
        if final:
            return f"{level}.{final[-1]}" if level else final[-1]
    return None


_MODALITIES = ("vision", "visual", "image", "audio", "speech", "video", "encoder", "depth",
               "vq")
_MODALITY_TOKENS = ("image_token", "video_token", "audio_token")


def _multimodal(config: Any) -> list[str]:
    """What declares a non-text input in a config (an instance or its class): sub-configs
    of another modality (a vision tower, Emu3's image VQ tokenizer ``vq_config``; MPT's
    ``attn_config`` is not one) or the id of the placeholder token images, video or audio
    replace (Fuyu embeds image patches with a linear layer and has no vision sub-config)."""
    cls = config if isinstance(config, type) else type(config)
    subs = [k for k in getattr(cls, "sub_configs", None) or {}
            if any(m in k for m in _MODALITIES)]
    names = ({f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls)
             else set()) | (set() if isinstance(config, type) else set(vars(config)))
    tokens = sorted(n for n in names if any(t in n for t in _MODALITY_TOKENS))
    return subs + tokens


def discover(model: nn.Module) -> ArchSpec:
    """Read the :class:`ArchSpec` off a ``*ForCausalLM`` (with or without LoRA)."""
    config = model.config
    model_type = str(getattr(config, "model_type", type(model).__name__))
    override = OVERRIDES.get(model_type, {})
    if "refuse" in override:
        raise _refuse(model_type, override["refuse"], "See docs/architectures.md.")
    if "refuse_if" in override and getattr(config, override["refuse_if"][0], None):
        field_name, why = override["refuse_if"]
        raise _refuse(model_type, f"{why} (its config sets {field_name})",
                      f"Set {field_name} to none to split it; see docs/architectures.md.")
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(model_type, "it is an encoder-decoder model; the server would need the "
                      "encoder's output at every block", "Use a decoder-only causal LM.")
    if _multimodal(config):
        raise _refuse(model_type, f"it is a multimodal wrapper (its config declares "
                      f"{_multimodal(config)})", "Load its text-only *ForCausalLM instead.")
    prefix = override.get("backbone", getattr(model, "base_model_prefix", ""))
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module):  # Llama 4's text model: prefix names another
        n_guess = _layer_count(config)[1]
        holders = [name for name, child in model.named_children()
                   if any(isinstance(m, nn.ModuleList) and len(m) == n_guess
                          for m in child.modules())]
        if len(holders) == 1:
            prefix, backbone = holders[0], getattr(model, holders[0])
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise _refuse(model_type, f"{type(model).__name__} has no separate backbone "
                      f"(base_model_prefix {prefix!r})", "Name it as 'backbone' in OVERRIDES.")
    n_field, n = override.get("n_layers"), 0
    if n_field is None:
        n_field, n = _layer_count(config)
    else:
        n = int(getattr(config, n_field))
    pp_plan = dict(getattr(config, "base_model_pp_plan", None) or {})
    tp_plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    blocks_path = override.get("blocks") or _block_list(backbone, n, model_type, pp_plan)
    block_list = cast(nn.ModuleList, backbone.get_submodule(blocks_path))
    head_module = cast(Any, model).get_output_embeddings()
    if head_module is None:
        raise _refuse(model_type, f"{type(model).__name__} has no output embeddings (LM head)",
                      "Use a *ForCausalLM class.")
    head = override.get("head") or next(
        (name for name, m in model.named_children()
         if m is head_module or any(d is head_module for d in m.modules())), "")
    if not head:
        raise _refuse(model_type, "its LM head is not a direct child of the causal LM",
                      "Name it as 'head' in OVERRIDES.")

    per_block: list[dict[str, Matrix]] = []
    orientation: set[bool] = set()
    for block in block_list:
        found = {}
        for path, layer in _linears(block):
            w = cast(torch.Tensor, layer.weight)
            fifo = _fan_in_fan_out(layer)
            orientation.add(fifo)
            d_in, d_out = (w.shape[0], w.shape[1]) if fifo else (w.shape[1], w.shape[0])
            stage = _stage(path, tp_plan)
            found[path] = Matrix(path, _kind(path, stage), int(d_out), int(d_in), stage,
                                 bias=getattr(layer, "bias", None) is not None,
                                 parts=_parts(path, int(d_out), config))
        per_block.append(found)
    if len(orientation) > 1:
        raise _refuse(model_type, "its blocks mix nn.Linear and Conv1D layers",
                      "Give the targets explicitly in OVERRIDES.")
    union: dict[str, Matrix] = {}
    for found in per_block:
        for path, m in found.items():
            union.setdefault(path, m)
    uniform = all(found == per_block[0] for found in per_block)
    excluded = override.get("exclude", ())
    targets = tuple(override.get("targets") or
                    [t for t in union if t.split(".")[-1] not in excluded])
    matrices = tuple(union[t] for t in targets if t in union)
    default = override.get("default_targets") or _default_targets(matrices)

    first = block_list[0] if len(block_list) else nn.Module()
    norms = tuple(name for name, m in first.named_modules()
                  if name and "norm" in type(m).__name__.lower())
    layer_norm = any(isinstance(first.get_submodule(n), nn.LayerNorm) for n in norms)
    embeddings = cast(Any, model).get_input_embeddings()
    positions = [m.num_embeddings for m in backbone.modules()
                 if isinstance(m, nn.Embedding) and m is not embeddings]
    final_norm = override.get("final_norm", _final_norm(backbone, blocks_path, pp_plan))
    block_ids = {id(p) for p in block_list.parameters()}
    shell = _unique_params(backbone, exclude=block_ids)
    backbone_ids = {id(p) for p in backbone.parameters()}
    return ArchSpec(
        backbone=prefix,
        blocks=blocks_path,
        final_norm=final_norm,
        n_layers=n_field,
        targets=targets,
        default_targets=tuple(default),
        fan_in_fan_out=orientation == {True},
        model_type=model_type,
        head=head,
        matrices=matrices,
        uniform=uniform,
        shell_params=shell,
        head_params=_unique_params(head_module, exclude=backbone_ids),
        block_params=tuple(_unique_params(b) for b in block_list),
        final_norm_params=_unique_params(backbone.get_submodule(final_norm)) if final_norm else 0,
        block_norms=norms,
        norm="layer" if layer_norm else "rms",
        positions=positions[0] if len(positions) == 1 else 0,
        # hyper-connections (DeepSeek V4, HY v4) widen the embeddings into hc_mult streams
        # before the blocks and collapse them after: a cut carries all of them
        streams=int(getattr(config, "hc_mult", None) or 1),
    )


def check_cut(config: Any, spec: ArchSpec, cut: int) -> None:
    """Refuse a cut that would need more than the residual state to cross it
    (``OVERRIDES`` ``refuse_at``: a per-layer config list whose entry marks such a block,
    on any server block or on the first)."""
    rule = OVERRIDES.get(spec.model_type, {}).get("refuse_at")
    if rule is None:
        return
    field_name, value, scope, why = rule
    types = list(getattr(config, field_name, None) or [])
    server = types[cut:] if scope == "server" else types[cut:cut + 1]
    if value in server:
        marked = [i for i, t in enumerate(types) if t == value]
        raise _refuse(spec.model_type, f"{why} (cut {cut}; {field_name} marks blocks "
                      f"{marked})", "Choose a cut no such block follows; see "
                      "docs/architectures.md.")


def _default_targets(matrices: tuple[Matrix, ...]) -> tuple[str, ...]:
    """SplitLoRA's choice: the query and value projections (a fused qkv matrix whole);
    failing those, every matrix reading the attention input; failing that, all."""
    qv = tuple(m.path for m in matrices if m.kind in ("q", "v", "qkv"))
    if qv:
        return qv
    attn = tuple(m.path for m in matrices if m.reads == "attn_in")
    return attn or tuple(m.path for m in matrices)


_SPECS: dict[tuple[type, str], ArchSpec] = {}


def _spec_of_config(config: Any) -> ArchSpec:
    from transformers import AutoModelForCausalLM

    key = (type(config), json.dumps(config.to_dict(), sort_keys=True, default=str))
    if key not in _SPECS:
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
            except ValueError as err:  # transformers: "Unrecognized configuration class ..."
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise _refuse(str(getattr(config, "model_type", type(config).__name__)),
                              "transformers has no causal LM class for this config",
                              f"({first})") from err
        _SPECS[key] = discover(model)
    return _SPECS[key]


def arch_spec(config_or_model: Any) -> ArchSpec:
    """The :class:`ArchSpec` of a model, or of a transformers config (discovered on a
    meta-device build of its causal LM, cached per config), or a clear :class:`SplitError`."""
    if isinstance(config_or_model, nn.Module):
        spec = getattr(config_or_model, "spec", None)
        return spec if isinstance(spec, ArchSpec) else discover(config_or_model)
    if config_or_model is None or not hasattr(config_or_model, "to_dict"):
        raise SplitError(f"cannot split {config_or_model!r}: expected a transformers config "
                         "or model")
    return _spec_of_config(config_or_model)


def client_blocks(cut: int, tail: int, n_blocks: int) -> range | list[int]:
    """The blocks a client holds: ``[0, cut)``, and with a tail (a U-shaped split) also
    ``[n_blocks - tail, n_blocks)``."""
    if not tail:
        return range(cut)
    return [*range(cut), *range(n_blocks - tail, n_blocks)]
