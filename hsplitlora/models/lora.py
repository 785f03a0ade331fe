"""Attach LoRA (HF peft) with per-module ranks, and move adapter state as plain tensors.

Adapters always cross a role boundary under the *unsplit* model's module names
(``model.layers.3.self_attn.q_proj.lora_A.weight``), whatever segment holds them, so
clients, servers, aggregators and the PEFT export agree on what each tensor is. A segment
translates with its ``full_name``/``local_name``; a whole model uses names as they are.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import peft
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from hsplitlora.errors import UserError
from hsplitlora.models.fused import PartLora
from hsplitlora.models.shared import merge_into, merge_state
from hsplitlora.models.split import arch_spec
from hsplitlora.models.structure import ArchSpec, Part, SplitError

__all__ = [
    "LoraSettings",
    "LoraTargetError",
    "adapter_shapes",
    "attach_lora",
    "base_weights",
    "check_targets",
    "lora_parameters",
    "tail_penalty",
    "lora_state",
    "restart_lora",
    "load_lora_state",
    "matrix_shapes",
    "merge_base_update",
    "parts_as_whole",
    "save_peft_adapter",
    "strip_lora",
    "target_module_names",
    "updates_as_adapter",
]

_ADAPTER = "default"
# peft names an adapter's tensors <module>.lora_A.default.weight; a part adapter
# (hsplitlora.models.fused) names them <module>.lora_A.<part>.weight
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_[AB])\.(?P<adapter>[^.]+)\.weight$")
_PART = ":"


class LoraTargetError(UserError, ValueError):
    """lora.targets names a matrix this architecture's blocks do not have."""


@dataclass(frozen=True)
class LoraSettings:
    """Which matrices get LoRA and at what rank.

    ``ranks`` overrides the default rank per module, keyed by the unsplit model's module
    name; a rank of 0 means that module gets no adapter (HSplitLoRA plans use it).
    """

    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # block-relative suffixes; None = the arch default
    ranks: Mapping[str, int] = field(default_factory=dict)
    alphas: Mapping[str, float] = field(default_factory=dict)  # per-module alpha overrides
    # Seeds the adapters' random initialisation (None: the global RNG). Parties that
    # re-initialise adapters in different processes (Ray actors) then draw the very
    # same A matrices as they would in one process.
    init_seed: int | None = None
    trains: tuple[str, ...] = ("A", "B")  # the factors trained; FFA-LoRA freezes A

    def __post_init__(self) -> None:
        if not self.trains or set(self.trains) - {"A", "B"}:
            raise ValueError(f"LoRA trains factors 'A' and/or 'B', not {self.trains!r}")

    def rank_of(self, module: str) -> int:
        return int(self.ranks.get(module, self.r))

    def alpha_of(self, module: str) -> float:
        return float(self.alphas.get(module, self.alpha))


def _identity(name: str) -> str:
    return name


def _namer(module: nn.Module) -> Callable[[str], str]:
    return getattr(module, "full_name", _identity)


def _blocks_prefix(module: nn.Module) -> str:
    """Name prefix of the block list: ``model.layers.`` on a model, ``backbone.layers.``
    on a segment."""
    spec = _spec(module)
    root = "backbone" if hasattr(module, "full_name") else spec.backbone
    return f"{root}.{spec.blocks}."


def _spec(module: nn.Module) -> ArchSpec:
    if hasattr(module, "spec"):
        return cast(ArchSpec, module.spec)
    try:
        return arch_spec(module.config)
    except SplitError:
        # a causal LM whose config has no causal-LM class of its own (Emu3's text model,
        # built from the multimodal entry): read the structure off the model itself
        if not hasattr(module, "get_output_embeddings"):
            raise
        return arch_spec(module)


def check_targets(spec: ArchSpec, wanted: tuple[str, ...] | list[str]) -> None:
    """Refuse targets the architecture's blocks do not have (``lora.targets``), whole
    matrices or parts of fused ones."""
    def known(t: str) -> bool:
        path, _, part = t.partition(_PART)
        hits = [m for m in spec.matrices if path == m.path or m.path.endswith("." + path)]
        return bool(hits) and (not part or any(p.label == part for m in hits for p in m.parts))

    unknown = [t for t in wanted if not known(t)]
    if unknown:
        fused = [f"{m.path}{_PART}{p.label}" for m in spec.matrices for p in m.parts]
        raise LoraTargetError(
            f"unknown LoRA target(s) {unknown} in lora.targets: this architecture's targetable "
            f"matrices are "
            f"{list(spec.targets)}" + (f", and parts of fused ones {fused}" if fused else "")
        )


def target_module_names(module: nn.Module, targets: tuple[str, ...] | None = None) -> list[str]:
    """Local names of the block-level linear layers that ``targets`` selects.

    ``targets`` are block-relative suffixes (``q_proj`` or ``attn.c_proj``); only modules
    inside the block list qualify, so GPT-2's ``mlp.c_proj`` never catches the LM head. A
    target ``attn.c_attn:q`` selects a part of a fused matrix; its names carry the part
    (``transformer.h.0.attn.c_attn:q``).
    """
    spec = _spec(module)
    wanted = spec.default_targets if targets is None else targets
    check_targets(spec, wanted)
    prefix = _blocks_prefix(module)
    names = []
    for name, _ in module.named_modules():
        if not name.startswith(prefix) or ".lora_" in name or name.endswith(".base_layer"):
            continue
        for t in wanted:
            path, _, part = t.partition(_PART)
            hit = f"{name}{_PART}{part}" if part else name
            if name.endswith("." + path) and hit not in names:
                names.append(hit)
    return names


def _fused_part(spec: ArchSpec, name: str) -> Part:
    """The :class:`Part` a ``<module>:<part>`` name selects."""
    module, _, label = name.partition(_PART)
    for m in spec.matrices:
        if module == m.path or module.endswith("." + m.path):
            return m.part(label)
    raise KeyError(f"{name}: not a part of a fused matrix of this {spec.model_type} model")


def _attach_parts(module: nn.Module, spec: ArchSpec, names: list[str],
                  settings: LoraSettings) -> None:
    full = _namer(module)
    by_module: dict[str, dict[Part, tuple[int, float]]] = {}
    for name in names:
        local, _, _ = name.partition(_PART)
        by_module.setdefault(local, {})[_fused_part(spec, name)] = (
            settings.rank_of(full(name)), settings.alpha_of(full(name)))
    for local, parts in by_module.items():
        parent_name, _, attr = local.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        base = getattr(parent, attr)
        if isinstance(base, (LoraLayer, PartLora)):
            raise ValueError(f"{full(local)} is targeted both whole and by parts; choose one")
        setattr(parent, attr, PartLora(base, parts, fan_in_fan_out=spec.fan_in_fan_out,
                                       dropout=settings.dropout))


def _peft_config(chosen: list[str], settings: LoraSettings, spec: ArchSpec,
                 full: Callable[[str], str]) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=chosen,
        rank_pattern={
            re.escape(n): settings.rank_of(full(n))
            for n in chosen
            if settings.rank_of(full(n)) != settings.r
        },
        alpha_pattern={
            re.escape(n): settings.alpha_of(full(n))
            for n in chosen
            if settings.alpha_of(full(n)) != settings.alpha
        },
        fan_in_fan_out=spec.fan_in_fan_out,
        bias="none",
    )


def attach_lora(module: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA into ``module`` in place and freeze everything else.

    Works on a whole causal LM or on a :mod:`~hsplitlora.models.split` segment. Ranks may
    differ per module (peft's ``rank_pattern``); the scale is ``alpha / r`` for each.
    """
    spec = _spec(module)
    full = _namer(module)
    selected = [n for n in target_module_names(module, settings.targets)
                if settings.rank_of(full(n)) > 0]
    chosen = [n for n in selected if _PART not in n]
    parts = [n for n in selected if _PART in n]
    for p in module.parameters():
        p.requires_grad_(False)
    if not selected:
        return module
    with torch.random.fork_rng(devices=[], enabled=settings.init_seed is not None):
        if settings.init_seed is not None:  # peft initialises on the CPU, then moves
            torch.manual_seed(settings.init_seed)
        if chosen:
            peft.inject_adapter_in_model(_peft_config(chosen, settings, spec, full), module,
                                         adapter_name=_ADAPTER)
        _attach_parts(module, spec, parts, settings)
    trained = tuple(f".lora_{part}." for part in settings.trains)
    for name, p in module.named_parameters():
        p.requires_grad_(any(t in name for t in trained))
        if ".lora_" in name:  # updates and optimizer state in fp32 even on a bf16 base
            p.data = p.data.float()
    return module


def matrix_shapes(module: nn.Module, targets: tuple[str, ...] | None = None
                  ) -> dict[str, tuple[int, int]]:
    """``(d_out, d_in)`` of each matrix ``targets`` selects in ``module`` (a model or a
    segment, with or without LoRA), under the unsplit model's names: the shape of a dense
    update to it, and what fixes the shapes of an adapter on it."""
    spec = _spec(module)
    full = _namer(module)
    out = {}
    for name in target_module_names(module, targets):
        local, _, label = name.partition(_PART)
        layer = module.get_submodule(local)
        if isinstance(layer, (LoraLayer, PartLora)):
            layer = layer.get_base_layer() if isinstance(layer, LoraLayer) else layer.base_layer
        rows, cols = layer.weight.shape
        d_out, d_in = (int(cols), int(rows)) if spec.fan_in_fan_out else (int(rows), int(cols))
        if label:
            d_out = _fused_part(spec, name).width
        out[full(name)] = (d_out, d_in)
    return out


def adapter_shapes(shapes: Mapping[str, tuple[int, int]], settings: LoraSettings,
                   default_targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """The adapter tensors (:func:`lora_state` names and shapes) that :func:`attach_lora`
    with ``settings`` puts on matrices of these ``shapes`` (``default_targets``: the
    architecture's, for settings that name none)."""
    targets = settings.targets if settings.targets is not None else default_targets
    out = {}
    for module, (d_out, d_in) in shapes.items():
        r = settings.rank_of(module)
        if r > 0 and any(module.endswith("." + t) for t in targets):
            out[f"{module}.lora_A.weight"] = (r, d_in)
            out[f"{module}.lora_B.weight"] = (d_out, r)
    return out


def lora_parameters(module: nn.Module, skip: Collection[str] = ()) -> list[nn.Parameter]:
    """The trained LoRA parameters, in a stable order (a frozen factor is left out);
    ``skip``: modules (unsplit names) whose adapters are left out too."""
    if not skip:
        return [p for n, p in module.named_parameters() if ".lora_" in n and p.requires_grad]
    kept = {id(p) for m, layer in _lora_layers(module).items() if m not in skip
            for p in layer.parameters()}
    return [p for n, p in module.named_parameters()
            if ".lora_" in n and p.requires_grad and id(p) in kept]


def _named_lora(module: nn.Module) -> dict[str, nn.Parameter]:
    """LoRA parameters keyed by the unsplit model's names (``<module>.lora_A.weight``)."""
    full = _namer(module)
    out = {}
    for name, p in module.named_parameters():
        m = _LORA_KEY.match(name)
        if m:
            part = "" if m["adapter"] == _ADAPTER else f"{_PART}{m['adapter']}"
            out[f"{full(m['module'])}{part}.{m['part']}.weight"] = p
    return out


def lora_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under the unsplit model's names (``<module>.lora_A.weight``).

    Returned tensors are detached copies: what a party sends must not alias what it
    keeps training.
    """
    return {k: p.detach().clone() for k, p in _named_lora(module).items()}


def trained_lora_keys(module: nn.Module) -> set[str]:
    """The keys of :func:`lora_state` that training changes (a frozen factor is left out)."""
    return {k for k, p in _named_lora(module).items() if p.requires_grad}


def load_lora_state(module: nn.Module | Sequence[nn.Module],
                    state: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors (unsplit names) into ``module``; every adapter must be given.
    ``module`` may be several that hold the adapters between them (a U-shaped client's
    head and tail segments).

    Shapes must match exactly: a rank change needs a new :func:`attach_lora`, not a
    silent resize.
    """
    modules = [module] if isinstance(module, nn.Module) else module
    own = {k: p for m in modules for k, p in _named_lora(m).items()}
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise KeyError(
            f"adapter state does not fit this module: missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected {extra[:4]}"
            f"{'...' if len(extra) > 4 else ''}"
        )
    with torch.no_grad():
        for key, p in own.items():
            value = state[key]
            if value.shape != p.shape:
                raise ValueError(
                    f"{key}: expected shape {tuple(p.shape)}, got {tuple(value.shape)}")
            p.copy_(value.to(dtype=p.dtype, device=p.device))


def save_peft_adapter(
    state: Mapping[str, torch.Tensor],
    settings: LoraSettings,
    out_dir: Path,
    *,
    base_model: str | None = None,
    fan_in_fan_out: bool = False,
    spec: ArchSpec | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's layout.

    ``state`` holds unsplit-model names (client and server halves merged), so
    ``peft.PeftModel.from_pretrained(base, out_dir)`` loads it onto the unsplit model, and
    with ``base_model`` a loadable id or path (``task_type`` is CAUSAL_LM)
    ``peft.AutoPeftModelForCausalLM.from_pretrained(out_dir)`` loads base and adapter.
    Target modules are listed by full name, with per-module ranks, because a
    heterogeneous plan may adapt a matrix in one block and not in the next; per-module
    alphas (``settings.alphas``) become peft's ``alpha_pattern``. Part adapters
    (``<module>:<part>``) are written as the exact whole-matrix adapter they equal
    (:func:`parts_as_whole`), which needs the model's ``spec``.
    """
    parted = sorted({k.partition(_PART)[0] for k in state if _PART in k})
    if parted and spec is None:
        raise ValueError(
            f"{len(parted)} module(s) carry part adapters ({parted[0]}, ...), which PEFT "
            "cannot load as such: pass the model's spec (arch_spec) to convert them exactly "
            "into whole-matrix adapters, or convert first with parts_as_whole")
    if parted and spec is not None:
        state, whole_alphas = parts_as_whole(state, settings, spec)
        settings = dataclasses.replace(settings, alphas={**settings.alphas, **whole_alphas})
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks: dict[str, int] = {}
    for key, tensor in state.items():
        if key.endswith(".lora_A.weight"):
            ranks[key[: -len(".lora_A.weight")]] = int(tensor.shape[0])
    modules = sorted(ranks)
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=modules,
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != settings.r},
        alpha_pattern={re.escape(m): settings.alpha_of(m) for m in modules
                       if settings.alpha_of(m) != settings.alpha},
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(out_dir))
    tensors = {
        f"base_model.model.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()
    }
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def restart_lora(module: nn.Module, settings: LoraSettings,
                 keep: Collection[str] = ()) -> nn.Module:
    """Fresh adapters (A random, B zero) as :func:`attach_lora` with ``settings`` would
    put on ``module``, whatever adapters it carries now; the adapters of the modules in
    ``keep`` (unsplit names) go on as they are, which needs the ranks ``settings`` asks
    for to be those they have.

    When the adapters there already have the ranks, scales and dropout ``settings`` asks
    for (a restart after a merge, with an unchanged plan), they are re-drawn in place:
    the very values a fresh attach would draw from ``settings.init_seed`` (peft builds
    A and B as ``nn.Linear`` layers, each drawing its default init, then re-draws A),
    without rebuilding a module tree, which costs about ten times more for a hundred
    participants. Otherwise the adapters are stripped and attached anew.
    """
    layers = _lora_layers(module)
    full = _namer(module)
    wanted = {full(n): settings.rank_of(full(n))
              for n in target_module_names(module, settings.targets)
              if settings.rank_of(full(n)) > 0}
    same = (settings.init_seed is not None and set(wanted) == set(layers) and all(
        layer.r[_ADAPTER] == wanted[m]
        and layer.scaling[_ADAPTER] == settings.alpha_of(m) / wanted[m]
        and getattr(layer.lora_dropout[_ADAPTER], "p", 0.0) == settings.dropout
        for m, layer in layers.items()))
    if not same:
        if set(keep) & set(layers):
            raise ValueError("restart_lora: adapters to keep need the ranks, scales and "
                             "dropout they have, and a seeded restart")
        strip_lora(module)
        return attach_lora(module, settings)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(settings.init_seed)
        for m, layer in layers.items():  # in module order, as peft injects them
            a, b = layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight
            for shape in (a.shape, b.shape):  # the nn.Linear default inits peft discards
                nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
            fresh = torch.empty(a.shape)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
            if m in keep:  # drawn all the same: the others get what a fresh attach gives
                continue
            a.copy_(fresh)
            b.zero_()
    return module


def tail_penalty(module: nn.Module, gamma: float, lam: float) -> None:
    """Back-propagate HetLoRA's regulariser ``lam * ||B[:, k:]|| ||A[k:]||``, ``k =
    floor(gamma r)``, over every LoRA layer of ``module``: it shrinks the trailing ranks so
    that rank self-pruning can drop them. A tail with a zero factor adds nothing (the
    norm has no gradient at zero, and the product is zero there anyway)."""
    if lam <= 0:
        return
    terms = []
    for layer in _lora_layers(module).values():
        A, B = layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight
        keep = max(1, math.floor(gamma * A.shape[0]))
        if keep >= A.shape[0] or not (A.requires_grad and B.requires_grad):
            continue
        b, a = torch.linalg.norm(B[:, keep:]), torch.linalg.norm(A[keep:])
        if float(b.detach()) > 0 and float(a.detach()) > 0:
            terms.append(b * a)
    if terms:
        (lam * torch.stack(terms).sum()).backward()


def _lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA-wrapped layers of ``module`` in module order, by unsplit name."""
    full = _namer(module)
    return {full(n): m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def parts_as_whole(
    state: Mapping[str, torch.Tensor], settings: LoraSettings, spec: ArchSpec
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Express part adapters as whole-matrix LoRA that PEFT loads, exactly.

    Parts ``p`` of one fused matrix with factors ``(A_p, B_p)`` and scales ``s_p`` equal
    one adapter of rank ``sum r_p``: ``A`` stacks the ``A_p``, ``B`` puts ``s_p B_p`` in the
    part's rows and columns (zeros elsewhere), at scale 1 (``alpha = rank``). Returns the
    state (other adapters unchanged) and the alphas of the converted modules.
    """
    out = {k: v for k, v in state.items() if _PART not in k}
    grouped: dict[str, list[str]] = {}
    for key in state:
        if _PART in key and key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            grouped.setdefault(name.partition(_PART)[0], []).append(name)
    alphas: dict[str, float] = {}
    for module, names in grouped.items():
        parts = sorted(((_fused_part(spec, n), n) for n in names), key=lambda x: x[0].start)
        a = [state[f"{n}.lora_A.weight"] for _, n in parts]
        rank = sum(int(t.shape[0]) for t in a)
        d_out = spec.matrix(module.split(".", len(spec.block_prefix.split(".")) + 1)[-1]).d_out
        b = a[0].new_zeros(d_out, rank)
        col = 0
        for (part, name), a_p in zip(parts, a, strict=True):
            r = int(a_p.shape[0])
            scale = settings.alpha_of(name) / r
            b[part.start:part.stop, col:col + r] = state[f"{name}.lora_B.weight"] * scale
            col += r
        out[f"{module}.lora_A.weight"] = torch.cat(a)
        out[f"{module}.lora_B.weight"] = b
        alphas[module] = float(rank)
    return out, alphas


def strip_lora(module: nn.Module) -> nn.Module:
    """Remove every LoRA layer in place, putting its (unmerged) base layer back.

    Used to re-plan: after a noise-free merge the learned update lives in the base
    weights, so the old adapters can go and new ones, at new ranks, be attached.
    """
    for name, child in list(module.named_modules()):
        if isinstance(child, (LoraLayer, PartLora)):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            base = child.get_base_layer() if isinstance(child, LoraLayer) else child.base_layer
            setattr(parent, attr, base)
    if "peft_config" in vars(module):  # inject_adapter_in_model's record of what it added
        del module.peft_config
    return module


def merge_base_update(
    module: nn.Module,
    updates: Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    version: int,
    *,
    fan_in_fan_out: bool = False,
) -> list[str]:
    """Merge each update (dense ``[d_out, n_in]`` or factors ``(U, V)``) into the base
    weight of the matching module this ``module`` holds, whether or not it carries LoRA.

    ``updates`` is keyed by the unsplit model's module names; names held elsewhere are
    skipped. ``version`` numbers the aggregation: parties sharing a frozen weight
    (:mod:`hsplitlora.models.shared`) may all apply it, and it is merged once. Returns
    the names merged here.
    """
    from hsplitlora.aggregate import dense_update

    # the parts of one fused matrix (c_attn:q, c_attn:v) merge as one update of it: a
    # merge version applies once per weight
    by_module: dict[str, list[tuple[str, str]]] = {}
    for full in updates:
        whole, _, label = full.partition(_PART)
        by_module.setdefault(whole, []).append((full, label))
    merged = []
    for whole, weight in base_weights(module, by_module).items():
        names = by_module[whole]
        merged.extend(full for full, _ in names)
        state = merge_state(weight)
        if state is not None and state.version >= version:
            continue  # a party sharing this weight merged it already
        shape = tuple(weight.shape)
        dense = torch.zeros(shape, dtype=torch.float32, device=weight.device)
        for full, label in names:
            if not label:
                dense += dense_update(updates[full], shape, fan_in_fan_out=fan_in_fan_out)
                continue
            part = _fused_part(_spec(module), full)
            rows = slice(part.start, part.stop)
            view = dense[:, rows] if fan_in_fan_out else dense[rows]
            view += dense_update(updates[full], tuple(view.shape),
                                 fan_in_fan_out=fan_in_fan_out).to(view.device)
        merge_into(weight, dense, version)
    return merged


def base_weights(module: nn.Module, names: Collection[str]) -> dict[str, torch.Tensor]:
    """The frozen base weight of each module in ``names`` (the unsplit model's names)
    that ``module`` holds, LoRA-wrapped or not. A part name (``<module>:<part>``) stands
    for its whole fused matrix: the result is keyed by whole-module names."""
    local_of = getattr(module, "local_name", _identity)
    out = {}
    for full in dict.fromkeys(n.partition(_PART)[0] for n in names):
        try:
            target = module.get_submodule(local_of(full))
        except (KeyError, AttributeError):
            continue
        if isinstance(target, LoraLayer):
            target = target.get_base_layer()
        elif isinstance(target, PartLora):
            target = target.base_layer
        out[full] = target.weight
    return out


def updates_as_adapter(
    updates: Mapping[str, torch.Tensor], rtol: float = 1e-6
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Express dense weight updates ``[d_out, n_in]`` as LoRA factors PEFT can load.

    A merged run (noise-free aggregation) keeps what it learned in the base weights; to
    hand it over as an adapter, each update is factorised by SVD at its numerical rank
    (singular values above ``rtol`` x the largest), which loses nothing beyond float
    rounding: ``B = U S``, ``A = V^T``, with ``alpha = rank`` so the scale is 1.
    Returns the flat adapter state and the per-module alphas.
    """
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for module, delta in updates.items():
        u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        rank = max(int((sv > rtol * sv[0]).sum()), 1) if sv.numel() else 1
        state[f"{module}.lora_B.weight"] = (u[:, :rank] * sv[:rank]).float().contiguous()
        state[f"{module}.lora_A.weight"] = vh[:rank].float().contiguous()
        alphas[module] = float(rank)
    return state, alphas
