"""Aggregate clients' LoRA adapters: FedAvg, zero-padding, SVD, stacking and noise-free merging.

Every function here is pure: plain tensors in, plain tensors out, no I/O, no model objects.

Conventions shared by all methods
---------------------------------
* One weight matrix's adapter is a :class:`LoraPair` ``(A [r, n_in], B [d_out, r], alpha)``
  whose update to the frozen weight is ``(alpha / r) * B @ A``, exactly peft's ``lora_A.weight``,
  ``lora_B.weight`` and ``lora_alpha``. A party's adapter state maps *module names* to pairs;
  pairs are matched by name, never by tensor shape.
* ``weights`` are per-client sample counts or shares. They are normalised to sum to one, must be
  ``>= 0`` and not all zero.
* A client's ``alpha`` is its own hyper-parameter and is never changed by the server. Whenever a
  method hands a client a pair at some rank, the factors absorb the scale so that the pair's
  ``scale * B @ A`` is exactly the update the method intends.
* The per-client methods (:func:`zeropad`, :func:`svd`) give each client back exactly the
  modules it sent.
* A module held by only some clients is aggregated over those clients. In the exact methods
  (:func:`weighted_delta`, :func:`stack`, :func:`noisefree`, :func:`svd`) ``renormalise`` picks
  between the contributors' weighted *average* (``True``: weights renormalised over the
  contributors) and the weighted *sum* with the global weights (``False``: absent clients count
  as a zero update).

Which methods are exact
-----------------------
``weighted_delta`` (dense reference), ``stack`` (FLoRA) and ``noisefree`` (HSplitLoRA) give
``sum_k p_k * scale_k * B_k @ A_k`` to float rounding. ``svd`` (FlexLoRA) is exact before each
client's rank truncation. ``fedavg`` (SplitLoRA, FedIT) and ``zeropad`` (HetLoRA) average
``A`` and ``B`` separately, so their product carries cross terms ``B_i A_j``: they are not the
weighted sum of the clients' updates unless all clients agree.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Factors",
    "LoraPair",
    "delta",
    "dense_or_factors",
    "fedavg",
    "from_peft_state_dict",
    "dense_update",
    "merge_update",
    "noisefree",
    "normalise_weights",
    "peft_adapter_name",
    "prune_regulariser",
    "prune_tail",
    "self_prune",
    "stack",
    "svd",
    "tail_share",
    "to_peft_state_dict",
    "truncate",
    "weighted_delta",
    "zeropad",
    "zeropad_global",
]

logger = logging.getLogger(__name__)

AdapterState = Mapping[str, "LoraPair"]


@dataclass(frozen=True, eq=False)
class LoraPair:
    """The LoRA adapter of one weight matrix; its update to that weight is ``scale * B @ A``.

    The layout is peft's: ``A`` is ``lora_A.weight`` ``[r, n_in]`` and ``B`` is
    ``lora_B.weight`` ``[d_out, r]``, so ``B @ A`` has the ``[d_out, n_in]`` layout of
    ``nn.Linear.weight`` (GPT-2's ``Conv1D`` stores the transpose; see :func:`merge_update`).
    ``eq=False`` because tensors have no single truth value; compare :func:`delta` instead.
    """

    A: Tensor
    B: Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise ValueError(
                f"LoraPair needs 2-D factors A [r, n_in] and B [d_out, r]; got A of shape "
                f"{tuple(self.A.shape)} and B of shape {tuple(self.B.shape)}"
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"LoraPair rank mismatch: A {tuple(self.A.shape)} has {self.A.shape[0]} rows but "
                f"B {tuple(self.B.shape)} has {self.B.shape[1]} columns; both must equal the rank"
            )
        if self.A.shape[0] < 1:
            raise ValueError("LoraPair needs rank >= 1; drop the module instead of passing rank 0")
        if self.A.dtype != self.B.dtype or self.A.device != self.B.device:
            raise ValueError(
                f"LoraPair factors must share dtype and device; got A {self.A.dtype} on "
                f"{self.A.device} and B {self.B.dtype} on {self.B.device}"
            )
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoraPair alpha must be a finite number > 0, got {self.alpha!r}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, n_in)``: the shape of the update ``B @ A``."""
        return int(self.B.shape[0]), int(self.A.shape[1])


class Factors(NamedTuple):
    """A low-rank update ``U @ V`` with ``U [d_out, R]`` and ``V [R, n_in]``, scale already in."""

    U: Tensor
    V: Tensor


# ---------------------------------------------------------------------------------------------
# peft state dicts

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _peft_key(module: str, factor: str, adapter_name: str | None) -> str:
    middle = f"lora_{factor}" if adapter_name is None else f"lora_{factor}.{adapter_name}"
    return f"{module}.{middle}.weight"


def peft_adapter_name(state_dict: Mapping[str, Tensor]) -> str | None:
    """The adapter name in a peft state dict's LoRA keys, or ``None`` when keys carry none.

    ``model.state_dict()`` of a ``PeftModel`` names it (``...q_proj.lora_A.default.weight``);
    ``peft.get_peft_model_state_dict`` strips it (``...q_proj.lora_A.weight``). Pass the result
    to :func:`from_peft_state_dict` and :func:`to_peft_state_dict` to round-trip either form.
    """
    names = {m["adapter"] for m in map(_PEFT_KEY.match, state_dict) if m is not None}
    if not names:
        raise ValueError(
            "no LoRA keys ('<module>.lora_A[.<adapter>].weight') in the state dict; "
            f"first keys: {list(state_dict)[:3]}"
        )
    if len(names) > 1:
        shown = sorted(repr(n) for n in names)
        raise ValueError(
            f"the state dict mixes LoRA adapters {', '.join(shown)}; export one adapter, e.g. "
            "peft.get_peft_model_state_dict(model, adapter_name=...)"
        )
    return names.pop()


def from_peft_state_dict(
    state_dict: Mapping[str, Tensor],
    alpha: float | Mapping[str, float],
    *,
    adapter_name: str | None = None,
) -> dict[str, LoraPair]:
    """Pair up ``<module>.lora_A[.<adapter>].weight`` / ``lora_B`` tensors by module name.

    peft state dicts do not carry ``lora_alpha``, so ``alpha`` is given: one number for every
    module, or a mapping from exact module name to alpha (resolve peft's ``alpha_pattern`` first).
    Every key must be a LoRA factor of adapter ``adapter_name``; anything else is an error rather
    than silently dropped.
    """
    found: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(
                f"state dict key {key!r} is not a LoRA factor key "
                "'<module>.lora_A[.<adapter>].weight' or '<module>.lora_B[.<adapter>].weight'; "
                "pass only LoRA A/B weights (embedding LoRA and DoRA are not supported)"
            )
        if match["adapter"] != adapter_name:
            raise ValueError(
                f"state dict key {key!r} belongs to adapter {match['adapter']!r}, but "
                f"adapter_name={adapter_name!r}; pass adapter_name=peft_adapter_name(state_dict)"
            )
        found.setdefault(match["module"], {})[match["factor"]] = tensor
    state: dict[str, LoraPair] = {}
    for module, factors in found.items():
        for have, lack in (("A", "B"), ("B", "A")):
            if lack not in factors:
                raise ValueError(
                    f"module {module!r} has {_peft_key(module, have, adapter_name)!r} but no "
                    f"{_peft_key(module, lack, adapter_name)!r}; every LoRA A needs its B"
                )
        if isinstance(alpha, Mapping):
            if module not in alpha:
                raise ValueError(f"no alpha given for module {module!r}; add it to `alpha`")
            module_alpha = float(alpha[module])
        else:
            module_alpha = float(alpha)
        try:
            state[module] = LoraPair(A=factors["A"], B=factors["B"], alpha=module_alpha)
        except ValueError as exc:
            raise ValueError(f"module {module!r}: {exc}") from exc
    return state


def to_peft_state_dict(
    state: AdapterState, *, adapter_name: str | None = None
) -> dict[str, Tensor]:
    """Flatten an adapter state to peft keys (``alpha`` lives in the peft config, not here)."""
    if adapter_name is not None and (not adapter_name or "." in adapter_name):
        raise ValueError(
            f"adapter_name must be a non-empty name without dots, got {adapter_name!r}"
        )
    flat: dict[str, Tensor] = {}
    for module, pair in state.items():
        flat[_peft_key(module, "A", adapter_name)] = pair.A
        flat[_peft_key(module, "B", adapter_name)] = pair.B
    return flat


# ---------------------------------------------------------------------------------------------
# shared checks and helpers


def normalise_weights(weights: Sequence[float], n_states: int | None = None) -> list[float]:
    """Aggregation weights scaled to sum to one; they must be finite, ``>= 0``, not all zero."""
    values = [float(w) for w in weights]
    if n_states is not None and len(values) != n_states:
        raise ValueError(
            f"got {len(values)} weights for {n_states} client states; give one weight per client"
        )
    for i, w in enumerate(values):
        if not math.isfinite(w) or w < 0:
            raise ValueError(
                f"weights[{i}] = {w!r}; aggregation weights are sample counts or shares and must "
                "be finite and >= 0"
            )
    total = math.fsum(values)
    if total <= 0:
        raise ValueError(
            f"weights {values} are all zero; at least one client needs a positive weight"
        )
    return [w / total for w in values]


def _modules(states: Sequence[AdapterState]) -> list[str]:
    """Union of module names, in first-seen order so outputs are deterministic."""
    return list(dict.fromkeys(m for state in states for m in state))


def _holders(states: Sequence[AdapterState], module: str) -> list[int]:
    return [k for k, state in enumerate(states) if module in state]


def _check_module(states: Sequence[AdapterState], module: str, holders: Sequence[int]) -> None:
    """All holders of ``module`` must adapt the same weight shape on the same device."""
    first = states[holders[0]][module]
    for k in holders[1:]:
        pair = states[k][module]
        if pair.shape != first.shape:
            raise ValueError(
                f"module {module!r}: clients disagree on the weight shape: client {holders[0]} "
                f"has [d_out, n_in] = {list(first.shape)}, client {k} has {list(pair.shape)}. "
                "All clients must adapt the same base model."
            )
        if pair.A.device != first.A.device:
            raise ValueError(
                f"module {module!r}: client {holders[0]} sent tensors on {first.A.device}, client "
                f"{k} on {pair.A.device}; move all states to one device before aggregating"
            )


def _holder_weights(
    p: Sequence[float], holders: Sequence[int], module: str, renormalise: bool
) -> list[float]:
    w = [p[k] for k in holders]
    total = math.fsum(w)
    if total <= 0:
        raise ValueError(
            f"module {module!r} is held only by clients {list(holders)}, whose weights are all 0; "
            "give one of them a positive weight or drop the module from their states"
        )
    return [x / total for x in w] if renormalise else w


def _dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate at least in float32 so half-precision adapters do not lose the average."""
    return torch.promote_types(dtype, torch.float32)


def _anchored_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_k w_k t_k`` for weights summing to one, written as ``t_0 + sum_k w_k (t_k - t_0)``.

    The two are equal when the weights sum to one; the anchored form makes identical inputs a
    bit-exact fixed point, so aggregating clients that agree changes nothing.
    """
    out_dtype = _dtype(tensors)
    ref = tensors[0].to(_work_dtype(out_dtype))
    acc = ref.clone()
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        acc += w * (t.to(acc.dtype) - ref)
    return acc.to(out_dtype)


def _owned(t: Tensor) -> Tensor:
    """A contiguous copy, so clients never share storage (training updates adapters in place)."""
    return t.clone(memory_format=torch.contiguous_format)


def _norm_of_product(pair: LoraPair) -> float:
    """``||scale * B @ A||_F`` from the ``r x r`` Gram matrices, never forming ``B @ A``."""
    dtype = _work_dtype(pair.A.dtype)
    a, b = pair.A.to(dtype), pair.B.to(dtype)
    squared = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)
    return abs(pair.scale) * math.sqrt(float(squared))


def _stacked(
    states: Sequence[AdapterState],
    p: Sequence[float],
    module: str,
    renormalise: bool,
) -> Factors:
    """``[B_1 ... B_K] @ [c_1 A_1; ...; c_K A_K]`` with ``c_k = w_k * scale_k``.

    Clients whose weight for this module is zero add nothing and are left out, so they cost no
    rank.
    """
    holders = _holders(states, module)
    _check_module(states, module, holders)
    w = _holder_weights(p, holders, module, renormalise)
    pairs = [(states[k][module], wk) for k, wk in zip(holders, w, strict=True) if wk > 0]
    dtype = _dtype([t for pair, _ in pairs for t in (pair.A, pair.B)])
    U = torch.cat([pair.B.to(dtype) for pair, _ in pairs], dim=1)
    V = torch.cat([pair.A.to(dtype) * (wk * pair.scale) for pair, wk in pairs], dim=0)
    return Factors(U=U, V=V)


def _ranks_out_checked(ranks_out: Sequence[int] | None, n_states: int) -> Sequence[int] | None:
    if ranks_out is None:
        return None
    if len(ranks_out) != n_states:
        raise ValueError(
            f"ranks_out has {len(ranks_out)} entries for {n_states} clients; give one per client"
        )
    for k, r in enumerate(ranks_out):
        if int(r) != r or r < 1:
            raise ValueError(f"ranks_out[{k}] = {r!r}; ranks must be integers >= 1")
    return ranks_out


# ---------------------------------------------------------------------------------------------
# exact reference


def delta(pair: LoraPair) -> Tensor:
    """The adapter's update to its weight, ``scale * B @ A`` (``[d_out, n_in]``)."""
    return pair.scale * (pair.B @ pair.A)


def weighted_delta(
    states: Sequence[AdapterState], weights: Sequence[float], *, renormalise: bool = True
) -> dict[str, Tensor]:
    """The exact aggregate ``sum_k p_k * scale_k * B_k @ A_k`` per module, as dense matrices.

    Deliberately the plain dense sum: it is the reference the other methods are measured
    against, not something to send over a network.
    """
    p = normalise_weights(weights, len(states))
    out: dict[str, Tensor] = {}
    for module in _modules(states):
        holders = _holders(states, module)
        _check_module(states, module, holders)
        w = _holder_weights(p, holders, module, renormalise)
        pairs = [states[k][module] for k in holders]
        dtype = _dtype([t for pair in pairs for t in (pair.A, pair.B)])
        work = _work_dtype(dtype)
        total = torch.zeros(pairs[0].shape, dtype=work, device=pairs[0].A.device)
        for pair, wk in zip(pairs, w, strict=True):
            total += (wk * pair.scale) * (pair.B.to(work) @ pair.A.to(work))
        out[module] = total.to(dtype)
    return out


# ---------------------------------------------------------------------------------------------
# FedAvg (SplitLoRA, FedIT)


def fedavg(states: Sequence[AdapterState], weights: Sequence[float]) -> dict[str, LoraPair]:
    """Average ``A`` and ``B`` separately, as SplitLoRA's ``fed_avg`` and FedIT do.

    Needs homogeneous adapters: every client adapts the same modules with the same rank and
    alpha. The product of the averages is not the average of the products (cross terms), which
    is why the heterogeneous methods below exist.
    """
    p = normalise_weights(weights, len(states))
    reference = set(states[0])
    for k, state in enumerate(states[1:], start=1):
        if set(state) != reference:
            lacks, extra = sorted(reference - set(state)), sorted(set(state) - reference)
            raise ValueError(
                f"fedavg needs every client to adapt the same modules; client {k} lacks {lacks} "
                f"and has extra {extra} compared with client 0. Use stack, noisefree, svd or "
                "zeropad for partial module sets."
            )
    out: dict[str, LoraPair] = {}
    for module in states[0]:
        holders = list(range(len(states)))
        _check_module(states, module, holders)
        pairs = [state[module] for state in states]
        ranks = [pair.rank for pair in pairs]
        if len(set(ranks)) > 1:
            raise ValueError(
                f"fedavg needs one LoRA rank per module, but module {module!r} has ranks {ranks} "
                "(client 0, 1, ...); use zeropad, svd, stack or noisefree for mixed ranks"
            )
        alphas = [pair.alpha for pair in pairs]
        if any(not math.isclose(a, alphas[0], rel_tol=1e-9) for a in alphas):
            raise ValueError(
                f"fedavg needs one lora_alpha per module, but module {module!r} has alphas "
                f"{alphas} (client 0, 1, ...); averaging factors with different scales is "
                "meaningless, use stack or noisefree"
            )
        out[module] = LoraPair(
            A=_anchored_mean([pair.A for pair in pairs], p),
            B=_anchored_mean([pair.B for pair in pairs], p),
            alpha=alphas[0],
        )
    return out


# ---------------------------------------------------------------------------------------------
# zero-padding (HetLoRA)


def zeropad_global(
    states: Sequence[AdapterState],
    weights: Sequence[float],
    rank: int | Mapping[str, int] | None = None,
    *,
    norm_weighted: bool = True,
) -> dict[str, LoraPair]:
    """HetLoRA's global adapter: per module, every holder's factors zero-padded to ``rank``
    (one for all modules, or per module name; ``None`` or a module missing from the
    mapping: the largest rank held) and averaged, ``A`` and ``B`` separately.

    Client ``k``'s weight is ``p_k * ||scale_k B_k A_k||_F`` renormalised over the clients that
    hold the module, HetLoRA's sparsity weighting (``norm_weighted=False`` uses ``p_k`` alone; if
    every update is zero, as right after LoRA's ``B = 0`` initialisation, the norms carry no
    information and ``p_k`` is used too).

    Scales: HetLoRA assumes one scale for all ranks (``alpha_k / r_k`` equal). To stay meaningful
    when scales differ, each client's scale is folded into its ``B`` relative to the first
    holder's scale ``s``, and the global pair carries ``alpha = s * rank`` (scale ``s``). With a
    common scale the folding is a multiplication by exactly one. This is the global model
    HetLoRA evaluates and hands out by :func:`truncate`.
    """
    p = normalise_weights(weights, len(states))
    return {module: _padded_mean(states, p, module,
                                 rank.get(module) if isinstance(rank, Mapping) else rank,
                                 norm_weighted)[0]
            for module in _modules(states)}


def _padded_mean(
    states: Sequence[AdapterState], p: Sequence[float], module: str, rank: int | None,
    norm_weighted: bool,
) -> tuple[LoraPair, float]:
    """The global pair of one module and the scale its ``B`` is expressed at."""
    holders = _holders(states, module)
    _check_module(states, module, holders)
    pairs = [states[k][module] for k in holders]
    w = _holder_weights(p, holders, module, renormalise=True)
    if norm_weighted:
        by_norm = [wk * _norm_of_product(pair) for pair, wk in zip(pairs, w, strict=True)]
        total = math.fsum(by_norm)
        if total > 0:
            w = [x / total for x in by_norm]
        else:
            logger.debug("zeropad: all updates of %s are zero; using data weights", module)
    r_max = max(pair.rank for pair in pairs)
    rank = r_max if rank is None else int(rank)
    if rank < r_max:
        raise ValueError(f"zeropad: global rank {rank} of module {module!r} is below the "
                         f"largest client rank {r_max}; HetLoRA's global adapter holds them all")
    s_ref = pairs[0].scale
    A = _anchored_mean([F.pad(pair.A, (0, 0, 0, rank - pair.rank)) for pair in pairs], w)
    B = _anchored_mean(
        [F.pad(pair.B * (pair.scale / s_ref), (0, rank - pair.rank)) for pair in pairs], w
    )
    return LoraPair(A=A, B=B, alpha=s_ref * rank), s_ref


def _truncated(pair: LoraPair, scale: float, rank: int, alpha: float, module: str) -> LoraPair:
    if rank > pair.rank:
        raise ValueError(
            f"zeropad: rank {rank} exceeds the rank {pair.rank} of the global adapter of module "
            f"{module!r}; ranks beyond it would be all-zero in both A and B and never train"
        )
    unfold = scale / (alpha / rank)
    return LoraPair(A=_owned(pair.A[:rank]), B=_owned(pair.B[:, :rank] * unfold), alpha=alpha)


def truncate(pair: LoraPair, rank: int, alpha: float, module: str = "?") -> LoraPair:
    """HetLoRA's distribution: the first ``rank`` ranks of the global pair (rows of ``A``,
    columns of ``B``) for a client with ``alpha``, so that the client's update
    ``(alpha / rank) B_k A_k`` is exactly the global update's first ``rank`` ranks."""
    return _truncated(pair, pair.scale, rank, alpha, module)


def zeropad(
    states: Sequence[AdapterState],
    weights: Sequence[float],
    ranks_out: Sequence[int] | None = None,
    norm_weighted: bool = True,
) -> list[dict[str, LoraPair]]:
    """HetLoRA's round trip: :func:`zeropad_global` at the largest rank held, then
    :func:`truncate` back to each client (``ranks_out[k]``, or its own per-module ranks when
    ``None``), with each client's own alpha. Client ``k`` gets back the modules it sent."""
    p = normalise_weights(weights, len(states))
    ranks_out = _ranks_out_checked(ranks_out, len(states))
    out: list[dict[str, LoraPair]] = [{} for _ in states]
    for module in _modules(states):
        glob, scale = _padded_mean(states, p, module, None, norm_weighted)
        for k in _holders(states, module):
            pair = states[k][module]
            r = pair.rank if ranks_out is None else int(ranks_out[k])
            if r > glob.rank:
                raise ValueError(
                    f"zeropad: ranks_out[{k}] = {r} exceeds the largest rank {glob.rank} of "
                    f"module {module!r}; ranks beyond it would be all-zero in both A and B and "
                    "never train"
                )
            sent = _truncated(glob, scale, r, pair.alpha, module)
            out[k][module] = LoraPair(A=sent.A.to(pair.A.dtype), B=sent.B.to(pair.B.dtype),
                                      alpha=pair.alpha)
    return out


def _kept_rank(rank: int, gamma: float) -> int:
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma = {gamma!r}; HetLoRA's kept fraction must lie in (0, 1]")
    return max(1, math.floor(gamma * rank))


def prune_regulariser(pair: LoraPair, gamma: float, lam: float = 1.0) -> Tensor:
    """HetLoRA's ``lam * ||B[:, keep:]||_F * ||A[keep:]||_F`` with ``keep = floor(gamma * r)``.

    Added to the client's loss, it pushes the top ``1 - gamma`` fraction of ranks towards zero
    so that :func:`self_prune` can drop them. Differentiable in ``A`` and ``B``.
    """
    keep = _kept_rank(pair.rank, gamma)
    return lam * torch.linalg.norm(pair.B[:, keep:]) * torch.linalg.norm(pair.A[keep:])


def self_prune(pair: LoraPair, gamma: float, threshold: float) -> LoraPair:
    """Drop the tail ranks ``[floor(gamma * r), r)`` when ``||B_tail|| ||A_tail|| < threshold``.

    The kept ranks' update is unchanged: ``alpha`` stays, and ``B`` is rescaled by ``keep / r``
    to make up for the larger ``alpha / keep``. At least one rank is always kept.
    """
    if threshold < 0:
        raise ValueError(f"threshold = {threshold!r}; the pruning threshold must be >= 0")
    keep = _kept_rank(pair.rank, gamma)
    if keep == pair.rank or float(prune_regulariser(pair, gamma)) >= threshold:
        return pair
    return LoraPair(
        A=_owned(pair.A[:keep]), B=_owned(pair.B[:, :keep] * (keep / pair.rank)), alpha=pair.alpha
    )


def _product_norm(B: Tensor, A: Tensor) -> float:
    """``||B @ A||_F`` from the ``r x r`` Gram matrices, never forming ``B @ A``."""
    work = _work_dtype(A.dtype)
    B, A = B.to(work), A.to(work)
    return math.sqrt(max(float(torch.sum((B.T @ B) * (A @ A.T))), 0.0))


def tail_share(pair: LoraPair, keep: int) -> float:
    """How much the ranks ``[keep, r)`` contribute to the update:
    ``||B[:, keep:] A[keep:]||_F / ||B A||_F`` (0 for a zero update: nothing to lose)."""
    whole = _product_norm(pair.B, pair.A)
    if whole == 0.0 or keep >= pair.rank:
        return 0.0
    return _product_norm(pair.B[:, keep:], pair.A[keep:]) / whole


def prune_tail(pair: LoraPair, gamma: float, threshold: float) -> LoraPair:
    """HetLoRA's rank self-pruning, decided by contribution: drop the ranks
    ``[floor(gamma * r), r)`` when :func:`tail_share` of them is below ``threshold``.

    A zero update (``B = 0``, nothing trained yet) is never pruned: its tail's share says
    nothing. The kept ranks' update is unchanged (``B`` absorbs ``keep / r`` as in
    :func:`self_prune`); at least one rank is kept.
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold = {threshold!r}; the share of the update below which the "
                         "tail ranks are pruned must lie in [0, 1)")
    keep = _kept_rank(pair.rank, gamma)
    if keep == pair.rank or _product_norm(pair.B, pair.A) == 0.0:
        return pair
    if tail_share(pair, keep) >= threshold:
        return pair
    return LoraPair(
        A=_owned(pair.A[:keep]), B=_owned(pair.B[:, :keep] * (keep / pair.rank)), alpha=pair.alpha
    )


# ---------------------------------------------------------------------------------------------
# SVD redistribution (FlexLoRA)


def _robust_svd(core: Tensor, module: str) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a small matrix, retried in float64, with LAPACK's gesvd, then with jitter."""
    c64 = core.to(torch.float64)
    attempts: list[tuple[str, Callable[[], tuple[Tensor, Tensor, Tensor]]]] = [
        (str(core.dtype), lambda: torch.linalg.svd(core, full_matrices=False))
    ]
    if core.dtype != torch.float64:
        attempts.append(("float64", lambda: torch.linalg.svd(c64, full_matrices=False)))
    if core.is_cuda:
        attempts.append(
            ("float64 gesvd", lambda: torch.linalg.svd(c64, full_matrices=False, driver="gesvd"))
        )
    size = float(c64.abs().max()) if c64.numel() else 0.0
    jitter = 1e3 * torch.finfo(torch.float64).eps * max(size, torch.finfo(torch.float64).tiny)
    eye = torch.eye(*c64.shape, dtype=torch.float64, device=c64.device)
    attempts.append(
        ("float64 + jitter", lambda: torch.linalg.svd(c64 + jitter * eye, full_matrices=False))
    )
    failures: list[str] = []
    for name, attempt in attempts:
        try:
            u, s, vh = attempt()
        except RuntimeError as exc:
            failures.append(f"{name}: {exc}")
            continue
        if not (u.isfinite().all() and s.isfinite().all() and vh.isfinite().all()):
            failures.append(f"{name}: non-finite result")
            continue
        if failures:
            logger.warning("SVD of %s succeeded with %s after: %s", module, name, failures)
        return u, s, vh
    raise RuntimeError(
        f"SVD of the aggregated update of module {module!r} failed in every attempt "
        f"({'; '.join(failures)}). Check the clients' adapters for huge magnitudes."
    )


def _lowrank_svd(factors: Factors, module: str) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``U @ V`` in ``O((d + n) R^2)``: QR of both factors, then SVD of the core."""
    U, V = factors
    if not (U.isfinite().all() and V.isfinite().all()):
        raise ValueError(
            f"module {module!r}: a client sent non-finite (inf/NaN) LoRA factors; find it with "
            "torch.isfinite on each client's A and B"
        )
    work = _work_dtype(U.dtype)
    qb, rb = torch.linalg.qr(U.to(work))
    qa, ra = torch.linalg.qr(V.to(work).T)
    uc, s, vch = _robust_svd(rb @ ra.T, module)
    return qb @ uc.to(work), s.to(work), vch.to(work) @ qa.T


def _split_pair(
    u: Tensor, s: Tensor, vh: Tensor, alpha: float, tol: float
) -> tuple[Tensor, Tensor]:
    """Factors ``B, A`` of rank ``len(s)`` with ``(alpha / r) * B @ A = u diag(s) vh``.

    ``sqrt(s / scale)`` goes to each side so both factors have the same norm. Directions with
    ``s <= tol`` (numerically zero) get ``A = vh`` and ``B = 0``: their product is still zero,
    but a zero ``A`` would freeze ``B``'s gradient and the rank would never train again.
    """
    root = torch.sqrt(s.clamp_min(0.0) / (alpha / s.numel()))
    alive = s > tol
    B = torch.where(alive, u * root, torch.zeros_like(u))
    A = torch.where(alive[:, None], root[:, None] * vh, vh)
    return B, A


def _padded_svd(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The leading ``rank`` singular triplets, padded with zero ones when there are fewer.

    The aggregate has ``min(d_out, n_in, R)`` singular values, which can be fewer than a
    client's rank (a rank above ``min(d_out, n_in)``, or zero-weight clients left out of
    ``R``). The padding has ``s = 0`` and reuses rows of ``vh``, so :func:`_split_pair` turns it
    into trainable null ranks.
    """
    have = s.numel()
    if rank <= have:
        return u[:, :rank], s[:rank], vh[:rank]
    extra = rank - have
    reused = torch.arange(have, rank, device=vh.device) % have
    return (
        F.pad(u, (0, extra)),
        F.pad(s, (0, extra)),
        torch.cat([vh, vh[reused]]),
    )


def svd(
    states: Sequence[AdapterState],
    weights: Sequence[float],
    ranks_out: Sequence[int] | None = None,
    *,
    renormalise: bool = True,
) -> tuple[list[dict[str, LoraPair]], dict[str, Tensor]]:
    """FlexLoRA: the exact weighted update, truncated by SVD to each client's rank.

    Never forms the dense ``d x n`` update: ``sum_k p_k scale_k B_k A_k`` is the stacked product
    ``U @ V`` of rank ``R = sum_k r_k``, whose SVD comes from QRs of ``U`` and ``V^T`` and the SVD
    of an ``R x R`` core. Client ``k`` gets the best rank-``ranks_out[k]`` approximation
    (Eckart-Young) of each module it sent, with its own alpha (``None``: its own ranks). Ranks
    beyond the aggregate's own rank come back as null ranks (``B`` column zero, ``A`` row of
    unit norm), so they add nothing yet still train.

    Returns the per-client states and, per module, all singular values in descending order;
    client ``k``'s truncation error is ``sigma[r_k:].norm()``.
    """
    p = normalise_weights(weights, len(states))
    ranks_out = _ranks_out_checked(ranks_out, len(states))
    out: list[dict[str, LoraPair]] = [{} for _ in states]
    spectra: dict[str, Tensor] = {}
    for module in _modules(states):
        factors = _stacked(states, p, module, renormalise)
        u, s, vh = _lowrank_svd(factors, module)
        spectra[module] = s
        tol = float(s.max()) * factors.U.shape[1] * torch.finfo(s.dtype).eps
        for k in _holders(states, module):
            pair = states[k][module]
            r = pair.rank if ranks_out is None else int(ranks_out[k])
            B, A = _split_pair(*_padded_svd(u, s, vh, r), pair.alpha, tol)
            out[k][module] = LoraPair(
                A=_owned(A.to(pair.A.dtype)), B=_owned(B.to(pair.B.dtype)), alpha=pair.alpha
            )
    return out, spectra


# ---------------------------------------------------------------------------------------------
# stacking (FLoRA) and noise-free aggregation (HSplitLoRA)


def stack(
    states: Sequence[AdapterState], weights: Sequence[float], *, renormalise: bool = True
) -> dict[str, LoraPair]:
    """FLoRA: concatenate along the rank, ``B = [B_1 ... B_K]``, ``A = [c_1 A_1; ...]``.

    ``c_k = p_k * scale_k``, and the returned pair has ``alpha = R = sum_k r_k`` (scale 1), so
    its update is exactly ``sum_k p_k scale_k B_k A_k``. Its rank grows with the number of
    clients; FLoRA merges it into the base weight and restarts the clients' adapters.
    """
    p = normalise_weights(weights, len(states))
    out: dict[str, LoraPair] = {}
    for module in _modules(states):
        U, V = _stacked(states, p, module, renormalise)
        out[module] = LoraPair(A=V, B=U, alpha=float(V.shape[0]))
    return out


def noisefree(
    states: Sequence[AdapterState], weights: Sequence[float], *, renormalise: bool = True
) -> dict[str, Factors]:
    """HSplitLoRA's noise-free aggregation: per module, stacked factors with the exact update.

    ``U @ V = sum_k p_k scale_k B_k A_k`` for any mix of ranks and alphas, with no cross terms.
    Only the factors travel (see :func:`dense_or_factors`); every copy of the base weight then
    applies :func:`merge_update` and the clients re-initialise their adapters.
    """
    p = normalise_weights(weights, len(states))
    return {module: _stacked(states, p, module, renormalise) for module in _modules(states)}


def dense_or_factors(factors: Factors) -> Factors | Tensor:
    """Whichever form of the update is smaller to send: the dense ``d x n`` matrix or factors.

    Dense wins when ``d * n < R * (d + n)``, i.e. once the stacked rank exceeds
    ``d n / (d + n)``.
    """
    (d, rank), n = factors.U.shape, factors.V.shape[1]
    if d * n < rank * (d + n):
        return factors.U @ factors.V
    return factors


def dense_update(update: Factors | Tensor | tuple[Tensor, Tensor], shape: tuple[int, ...],
                 fan_in_fan_out: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
    """An update (dense ``[d_out, n_in]``, :class:`Factors` or a ``(U, V)`` pair) as one
    ``dtype`` tensor in the layout of a weight of ``shape``: ``fan_in_fan_out=True`` is for
    GPT-2's ``Conv1D``, whose weight is stored ``[n_in, d_out]``."""
    if isinstance(update, tuple) and not isinstance(update, Factors):
        update = Factors(*update)
    if isinstance(update, Tensor):
        dense = update.to(dtype)
    else:
        dense = update.U.to(dtype) @ update.V.to(dtype)
    if fan_in_fan_out:
        dense = dense.T
    if tuple(dense.shape) != tuple(shape):
        hint = ""
        if tuple(dense.T.shape) == tuple(shape):
            hint = f"; the transpose fits, so set fan_in_fan_out={not fan_in_fan_out}"
        raise ValueError(
            f"update of shape {tuple(dense.shape)} (after fan_in_fan_out={fan_in_fan_out}) "
            f"does not fit weight of shape {tuple(shape)}{hint}"
        )
    return dense


def merge_update(weight: Tensor, factors: Factors | Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """``weight + U @ V`` as a new tensor of ``weight``'s dtype; the input is left untouched.

    ``factors`` may also be the dense ``[d_out, n_in]`` update from :func:`dense_or_factors`.
    The sum is formed in at least float32 so half-precision weights round only once.
    """
    work = _work_dtype(weight.dtype)
    update = dense_update(factors, tuple(weight.shape), fan_in_fan_out, work)
    return (weight.to(work) + update).to(weight.dtype)
