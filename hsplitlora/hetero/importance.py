"""Important weight identification (HSplitLoRA IWI): which weight matrices deserve adapters.

**What the planner reads: rank gains.** For each adaptable matrix W, with G the gradient
of the mean loss with respect to W averaged over the probe batches (the *accumulated*
gradient) and sigma_1 >= sigma_2 >= ... its singular values::

    E_W(r) = sum_{i <= r} sigma_i^2            (gradient energy within rank r)

is the first-order loss decrease per unit learning rate of one gradient step restricted
to the best rank-r subspace (Eckart-Young: ``<G, P_r(G)> = ||P_r(G)||_F^2``). It answers
"how much would adapting W at rank r help", where the sensitivity below answers "how much
would removing W hurt". It is concave in r (sorted singular values) and saturates at the
gradient's own effective rank, so a matrix whose gradient is nearly rank one gains little
from rank 16. :func:`segment_importance` reports E_W at the ranks :data:`GAIN_RANKS` as a
flat map ``"<module>@<r>" -> E_W(r)`` (one float per entry, so it travels, averages over
clients and smooths over rounds like any score map); :func:`rank_gains` reads it back at
the planner's ranks (linear between measured ranks, which keeps it concave). Scoring uses
the run's loss, label smoothing included. **Memory:** the accumulated gradient is one
fp32 matrix per scored linear, held while probing (the size of the party's frozen
candidate weights in fp32), the price of an exact spectrum.

**Sensitivity** (kept for reports and tests, not read by the planner):

**What is scored.** Every targetable linear of every block (``ArchSpec.targets``): for the
Llama family ``q, k, v, o, gate, up, down``; for GPT-2 ``attn.c_proj``, ``mlp.c_fc``,
``mlp.c_proj`` and the query, key and value *parts* of the fused ``attn.c_attn``, scored
separately as ``transformer.h.0.attn.c_attn:q`` (``:k``, ``:v``) so a report can say which
of the three matters. Names are always the unsplit model's, whichever party scored them.

**Formula.** On probe batches b = 1..B, with G_b = dL_b/dW the gradient of the mean
next-token loss of batch b with respect to the *frozen* base weight::

    s(W) = 1/B * sum_b mean_ij |W_ij * G_b,ij|            (first-order Taylor sensitivity)
    I(W) = s(W) / c(W),   c(W) = (d_in + d_out) / mean over candidates of (d_in + d_out)

s is the PLATON/AdaLoRA sensitivity: |W_ij G_ij| estimates how much the loss changes if
W_ij is removed, so it combines the static (weight magnitude) and dynamic (gradient)
contribution the paper names. The absolute value is taken per batch, before averaging, so
gradients of opposite sign on different batches do not cancel. It is a per-element mean,
so a large matrix does not win by size alone. c is the cost the paper asks to normalise
by: a rank-r adapter on a (d_out x d_in) matrix adds r (d_in + d_out) parameters, and the
FLOPs, gradient and optimiser memory it costs scale the same way. Dividing by the mean
makes c dimensionless (I has the units of s). Every block of these architectures has the
same shapes, so the mean over any set of whole blocks is the same number: a client and
the server normalising their own candidates separately get comparable importances.
``normalise=False`` gives I = s.

**What s does not measure.** It is a removal sensitivity, not a diagnosis of which matrix
is "wrong". Perturb one matrix of a tiny Llama and score it against the unperturbed
model's outputs (KL): the matrices that can compensate get gradients too, often larger
ones, and the perturbed matrix ranked first in only 12 of 84 trials. And the two factors
of a product (v and o, up and down) score alike, because sum_ij W_ij G_ij is the same for
both. A matrix that cannot change the loss does score 0 (tested).

**Fused matrices.** LoRA adapts GPT-2's ``c_attn`` as one matrix, so parts are combined
into the module by their *size-weighted mean*, which is exactly s computed on the whole
fused matrix (sum of |W G| over all its elements / its size); the module is then divided
by its own cost (d_in + 3 d). A plain sum of part means would count c_attn three times
against unfused matrices, and a max would let one part speak for an adapter that pays
for all three.

**Smoothing.** :class:`ImportanceTracker` keeps the "weighted average of current and
historical importance": Ī_1 = I_1, then Ī_t = β_t Ī_(t-1) + (1 - β_t) I_t. β is fixed, or
with ``adaptive=True`` set each round from the fluctuation
ρ_t = sum_k |I_t(k) - Ī_(t-1)(k)| / sum_k |Ī_(t-1)(k)| (over matrices seen in both) as
β_t = β_low + (β_high - β_low) ρ_half / (ρ_half + ρ_t): when importance is stable (late
training, small ρ) history dominates (β -> β_high); when it moves (early training, a shift
in the data) the new measurement is followed (β -> β_low); at ρ = ρ_half β is halfway.
The paper's own rule is unpublished; this is our reconstruction of its description.

**Who scores what.** Each party scores only the blocks it holds, on its own data, with the
split protocol it trains with: the client runs its segment forward, sends
:class:`~hsplitlora.roles.messages.Activations`, the server (:class:`ServerScorer`) runs
its blocks, computes the loss (only it has the head), back-propagates through its blocks
(scoring them) and replies with dL/d(activations); the client back-propagates that into
its blocks (scoring them). Because the split is exact, the union of both parties' scores
equals :func:`score_model` on the unsplit model on the same batches. Scoring runs in eval
mode (no dropout), so it is deterministic.

**Memory.** No base weight ever gets ``requires_grad`` (all parameters are frozen while
scoring and their flags restored afterwards) and no full-size gradient is kept: a forward
hook on each base linear keeps its input x, a tensor hook on its output receives δ =
dL/d(output) during backward, and the hook immediately forms G = δᵀ x in fp32 (also under
bf16 autocast), reduces |W ⊙ G| to one scalar per matrix (or per part) and drops x, δ and
G. Peak extra memory is one layer's gradient plus the inputs of the linears awaiting
their δ, the same activations LoRA training keeps for its A matrices. Where nothing
upstream requires grad (the first blocks, frozen), the hook makes the layer's output a
grad-requiring leaf of equal value, so δ still flows. With peft LoRA attached the hook sits
on ``<module>.base_layer``, whose output gradient is that of the whole wrapped layer.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hsplitlora.models.lora import target_module_names
from hsplitlora.models.split import ArchSpec, ClientSegment, ServerSegment, arch_spec
from hsplitlora.roles.messages import Activations, ServerReply
from hsplitlora.runtime.optim import autocast, causal_lm_loss

__all__ = [
    "GAIN_RANKS",
    "Candidate",
    "ImportanceTracker",
    "ProbeServer",
    "SensitivityProbe",
    "ServerScorer",
    "candidates",
    "fuse_parts",
    "global_importance_by_block",
    "importance",
    "module_energy",
    "module_of",
    "rank_energies",
    "rank_gains",
    "ranking",
    "relative_costs",
    "score_client",
    "score_model",
    "score_segment",
    "score_server",
    "segment_importance",
]

B = TypeVar("B")
Batch = Mapping[str, torch.Tensor]

# A part of a fused matrix is named "<module>:<part>"; which matrices are fused, and how
# their output rows divide, is the discovered structure's fact (Matrix.parts).
_PART_SEP = ":"
_RANK_SEP = "@"
GAIN_RANKS = (1, 2, 4, 8, 16, 32, 64)  # ranks at which gradient energies are reported


@dataclass(frozen=True)
class Candidate:
    """One scored matrix: a whole linear, or one part of a fused one (``name:part``)."""

    name: str  # unsplit-model module name, with ``:part`` for a part of a fused matrix
    block: int  # global block index
    d_in: int
    d_out: int  # output width of this matrix (of the part, for a part)

    @property
    def module(self) -> str:
        """The adaptable module: LoRA adapts a fused matrix as a whole."""
        return self.name.split(_PART_SEP, 1)[0]

    @property
    def numel(self) -> int:
        return self.d_in * self.d_out

    @property
    def cost(self) -> int:
        """Adapter parameters per unit rank: A is (r x d_in), B is (d_out x r)."""
        return self.d_in + self.d_out


def _spec(module: nn.Module) -> ArchSpec:
    spec = getattr(module, "spec", None)
    return spec if isinstance(spec, ArchSpec) else arch_spec(getattr(module, "config", None))


def _base_layer(module: nn.Module) -> nn.Module:
    """The frozen linear under any peft wrapping (``<module>.base_layer``)."""
    base = getattr(module, "base_layer", None)
    while isinstance(base, nn.Module):
        module, base = base, getattr(base, "base_layer", None)
    return module


def _orientation(layer: nn.Module, name: str) -> bool:
    """True when the weight is stored (in, out) as in GPT-2's Conv1D."""
    if isinstance(layer, nn.Linear):
        return False
    if isinstance(layer, Conv1D):
        return True
    raise TypeError(
        f"{name}: cannot score a {type(layer).__name__}; importance needs an nn.Linear or a "
        "transformers Conv1D as the targeted (base) layer. Remove it from ArchSpec.targets "
        "or teach hsplitlora.hetero.importance its weight layout."
    )


def _weight(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _block_of(name: str) -> int:
    """Block index of a block-level name: its first all-digit dotted component."""
    for part in name.split(_PART_SEP, 1)[0].split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"{name!r} names no block: expected e.g. 'model.layers.3.mlp.up_proj'")


@dataclass(frozen=True)
class _Target:
    """A hooked base layer and the candidates its weight is cut into (output-row slices)."""

    layer: nn.Module
    fan_in_fan_out: bool
    parts: tuple[tuple[Candidate, slice], ...]


def _targets(module: nn.Module) -> list[_Target]:
    spec = _spec(module)
    full = getattr(module, "full_name", lambda n: n)
    found = []
    for local in target_module_names(module, spec.targets):
        name = full(local)
        layer = _base_layer(module.get_submodule(local))
        fan_in_fan_out = _orientation(layer, name)
        rows, cols = (int(n) for n in _weight(layer).shape)
        d_in, d_out = (rows, cols) if fan_in_fan_out else (cols, rows)
        suffix = next(t for t in spec.targets if local.endswith("." + t))
        fused = spec.matrix(suffix).parts if suffix in {m.path for m in spec.matrices} else ()
        block = _block_of(name)
        parts: tuple[tuple[Candidate, slice], ...]
        if not fused or fused[-1].stop != d_out:
            parts = ((Candidate(name, block, d_in, d_out), slice(0, d_out)),)
        else:
            parts = tuple(
                (Candidate(f"{name}{_PART_SEP}{p.label}", block, d_in, p.width),
                 slice(p.start, p.stop))
                for p in fused
            )
        found.append(_Target(layer, fan_in_fan_out, parts))
    return found


def candidates(module: nn.Module) -> list[Candidate]:
    """The matrices a model or split segment scores, in block order, under unsplit names."""
    return [cand for target in _targets(module) for cand, _ in target.parts]


class SensitivityProbe:
    """Accumulates s(W) = mean over backward passes of mean_ij |W ⊙ dL/dW| via hooks.

    Use as a context manager around forward+backward passes of ``module`` (a causal LM or
    a split segment). Each targeted layer must run once per forward pass: a second call
    before its gradient arrived (gradient checkpointing, weight reuse) is an error rather
    than a silently wrong score. The probe does not change ``requires_grad``; it also
    works wrapped around training steps, where it adds no extra pass.
    """

    def __init__(self, module: nn.Module, *, spectrum: bool = False) -> None:
        self._targets = _targets(module)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._spectrum = spectrum  # also accumulate each module's gradient (fp32, its size)
        self._grads: dict[str, torch.Tensor] = {}
        self._pending: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> SensitivityProbe:
        for target in self._targets:
            self._handles.append(target.layer.register_forward_hook(
                self._forward_hook(target), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def _forward_hook(self, target: _Target) -> Callable[..., torch.Tensor | None]:
        key = id(target)

        def hook(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None
            if key in self._pending:
                raise RuntimeError(
                    f"{target.parts[0][0].module} ran twice in one forward pass (gradient "
                    "checkpointing or a reused layer?); importance scoring needs one call "
                    "per pass: disable checkpointing while scoring."
                )
            x = args[0] if args else next(iter(kwargs.values()))
            self._pending[key] = x.detach()
            out = output if output.requires_grad else output.detach().requires_grad_(True)
            out.register_hook(lambda grad: self._accumulate(target, grad))
            return None if out is output else out

        return hook

    def _accumulate(self, target: _Target, grad: torch.Tensor) -> None:
        x = self._pending.pop(id(target), None)
        if x is None:
            raise RuntimeError(f"{target.parts[0][0].module}: gradient arrived twice for one "
                               "forward pass (backward with retain_graph?); score each batch once")
        delta = grad.reshape(-1, grad.shape[-1]).float()
        grad_w = delta.T @ x.reshape(-1, x.shape[-1]).float()  # (d_out, d_in), fp32
        if self._spectrum:
            module = target.parts[0][0].module
            if module in self._grads:
                self._grads[module] += grad_w
            else:
                self._grads[module] = grad_w.clone()
        weight = _weight(target.layer).detach().float()
        contribution = (grad_w * (weight.T if target.fan_in_fan_out else weight)).abs_()
        for cand, rows in target.parts:
            value = contribution[rows].mean()
            if cand.name in self._sums:
                self._sums[cand.name] += value
            else:
                self._sums[cand.name] = value
            self._counts[cand.name] = self._counts.get(cand.name, 0) + 1

    def sensitivities(self) -> dict[str, float]:
        """s(W) for every candidate, in block order; each must have seen a gradient."""
        names = [cand.name for target in self._targets for cand, _ in target.parts]
        missing = [n for n in names if n not in self._counts]
        if missing:
            raise RuntimeError(
                f"no gradient reached {missing[:3]}{'...' if len(missing) > 3 else ''}: run "
                "at least one forward and backward pass through them inside the probe"
            )
        return {n: float(self._sums[n]) / self._counts[n] for n in names}

    def energies(self, ranks: Sequence[int] = GAIN_RANKS) -> dict[str, float]:
        """``"<module>@<r>" -> E(r)`` of each module's mean gradient over the passes seen
        (needs ``spectrum=True``)."""
        if not self._spectrum:
            raise RuntimeError("construct the probe with spectrum=True to get energies")
        self.sensitivities()  # every candidate must have seen a gradient
        out: dict[str, float] = {}
        for target in self._targets:
            module = target.parts[0][0].module
            count = self._counts[target.parts[0][0].name]
            sigma = _singular_values(self._grads[module] / count)
            for r, energy in rank_energies(sigma, ranks).items():
                out[f"{module}{_RANK_SEP}{r}"] = energy
        return out


@contextlib.contextmanager
def _scoring(module: nn.Module) -> Iterator[None]:
    """Freeze every parameter and switch dropout off; restore both flags afterwards."""
    grad_flags = [(p, p.requires_grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    try:
        for p, _ in grad_flags:
            p.requires_grad_(False)
        module.eval()
        yield
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.train(mode)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _to(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def score_segment(
    segment: nn.Module,
    batches: Iterable[B],
    forward_fn: Callable[[B], torch.Tensor],
    backward_fn: Callable[[torch.Tensor, B], torch.Tensor | None],
) -> dict[str, float]:
    """Sensitivities of ``segment``'s matrices, whatever it is and wherever its loss is.

    Per batch: ``out = forward_fn(batch)``; ``grad = backward_fn(out.detach(), batch)``
    gives dL/d(out) (``None`` when ``out`` is the loss itself); ``out.backward(grad)``.
    ``backward_fn`` is always called, even when ``out`` needs no gradient (a client at cut
    0), so a remote party on the other end of it still sees every batch.
    """
    return _run_probe(segment, batches, forward_fn, backward_fn).sensitivities()


def _run_probe(
    segment: nn.Module,
    batches: Iterable[B],
    forward_fn: Callable[[B], torch.Tensor],
    backward_fn: Callable[[torch.Tensor, B], torch.Tensor | None],
    spectrum: bool = False,
) -> SensitivityProbe:
    with _scoring(segment), SensitivityProbe(segment, spectrum=spectrum) as probe:
        for batch in batches:
            out = forward_fn(batch)
            grad = backward_fn(out.detach(), batch)
            if out.requires_grad:
                out.backward(grad)
    return probe


def score_model(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    precision: str = "fp32",
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """Sensitivities on the unsplit model: the centralized reference for the split scores."""
    device = _device(model)

    def loss(batch: Batch) -> torch.Tensor:
        b = _to(batch, device)
        with autocast(precision, device):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return causal_lm_loss(logits, b["labels"], label_smoothing)[0]

    return score_segment(model, batches, loss, lambda out, batch: None)


class ProbeServer(Protocol):
    """The main server's side of split probing, in process or over a transport: as a
    training step would, without updating anything."""

    def reply(self, acts: Activations) -> ServerReply:
        """Blocks ``[k, L)`` and the loss on the upload; the gradient at the cut."""
        ...

    def forward(self, acts: Activations) -> torch.Tensor:
        """A U-shaped split's middle: the activations at the client's tail."""
        ...

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        """The tail's gradient back through the middle: the gradient at the cut."""
        ...


def score_client(
    segment: ClientSegment,
    batches: Iterable[Batch],
    server: ProbeServer,
    *,
    precision: str = "fp32",
) -> dict[str, float]:
    """A client scores its blocks on its own batches, with the server's gradients
    (:class:`ServerScorer` in process, a transport's round trips otherwise)."""
    return _probe_client(segment, batches, server, precision).sensitivities()


def _probe_client(
    segment: ClientSegment,
    batches: Iterable[Batch],
    server: ProbeServer,
    precision: str,
    spectrum: bool = False,
    tail: ServerScorer | None = None,
) -> SensitivityProbe:
    """``tail``: a U-shaped client's own scorer of its tail, which takes the loss on the
    labels kept here between the server's two hops (the server never sees them)."""
    device = _device(segment)

    def forward(batch: Batch) -> torch.Tensor:
        b = _to(batch, device)
        with autocast(precision, device):
            return segment(b["input_ids"], b["attention_mask"])

    def round_trip(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        mask, labels = batch["attention_mask"], batch["labels"]
        if tail is None:
            grad = server.reply(Activations(hidden, mask, labels)).grad
        else:
            middle = server.forward(Activations(hidden, mask, None))
            grad = server.backward(tail.reply(Activations(middle, mask, labels)).grad)
        return grad.to(device=hidden.device, dtype=hidden.dtype)

    return _run_probe(segment, batches, forward, round_trip, spectrum)


def segment_importance(
    segment: ClientSegment,
    batches: Iterable[Batch],
    server: ProbeServer,
    precision: str = "fp32",
    *,
    tail: ServerSegment | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """A client's importance map: the gradient energies ``"<module>@<r>" -> E(r)`` of
    every adaptable module of its segment (and of a U-shaped client's ``tail``, which
    takes the run's loss here), at :data:`GAIN_RANKS`, from split probing with the
    server's gradients (the server's reply carries the run's loss)."""
    if tail is None:
        return _probe_client(segment, batches, server, precision, spectrum=True).energies()
    with ServerScorer(tail, precision=precision, label_smoothing=label_smoothing,
                      spectrum=True) as scorer:
        head = _probe_client(segment, batches, server, precision, True, scorer).energies()
    return {**head, **scorer.energies()}


class ServerScorer:
    """The main server's side of split scoring: scores its blocks while it answers uploads.

    Within the ``with`` block, each :meth:`reply` runs the server blocks on received
    activations, takes the loss, back-propagates (scoring its matrices) and returns the
    activation gradient, exactly as a training step would, without updating anything. A
    U-shaped split's middle answers in two hops instead, :meth:`forward` then
    :meth:`backward`; a U-shaped client scores its tail with a scorer of its own.
    """

    def __init__(
        self, segment: ServerSegment, *, precision: str = "fp32", label_smoothing: float = 0.0,
        spectrum: bool = False,
    ) -> None:
        self.segment = segment
        self.precision = precision
        self.label_smoothing = label_smoothing
        self._probe = SensitivityProbe(segment, spectrum=spectrum)
        self._stack = contextlib.ExitStack()
        self._held: tuple[torch.Tensor, torch.Tensor] | None = None  # a middle's forward

    def __enter__(self) -> ServerScorer:
        self._stack.enter_context(_scoring(self.segment))
        self._stack.enter_context(self._probe)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def reply(self, acts: Activations) -> ServerReply:
        if acts.labels is None:
            raise ValueError("the server's scorer needs the labels: a U-shaped client keeps "
                             "them, so its probing is forward() and backward()")
        hidden = self._received(acts)
        with autocast(self.precision, hidden.device):
            logits = self.segment(hidden, acts.attention_mask.to(hidden.device))
        loss, tokens = causal_lm_loss(logits, acts.labels.to(hidden.device),
                                      self.label_smoothing)
        loss.backward()
        assert hidden.grad is not None
        return ServerReply(float(loss.detach()), tokens, hidden.grad)

    def forward(self, acts: Activations) -> torch.Tensor:
        hidden = self._received(acts)
        with autocast(self.precision, hidden.device):
            out = self.segment(hidden, acts.attention_mask.to(hidden.device))
        self._held = (hidden, out)
        return out.detach()

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        if self._held is None:
            raise RuntimeError("the server's scorer got a gradient before the activations")
        (hidden, out), self._held = self._held, None
        out.backward(grad.to(device=out.device, dtype=out.dtype))
        assert hidden.grad is not None
        return hidden.grad

    def _received(self, acts: Activations) -> torch.Tensor:
        return acts.hidden.to(_device(self.segment)).detach().requires_grad_(True)

    def scores(self) -> dict[str, float]:
        """Sensitivities of the server's matrices over all replies so far."""
        return self._probe.sensitivities()

    def energies(self) -> dict[str, float]:
        """Gradient energies of the server's modules (built with ``spectrum=True``)."""
        return self._probe.energies()


def score_server(
    segment: ServerSegment,
    uploads: Iterable[Activations],
    *,
    precision: str = "fp32",
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """The server scores its blocks from activations (and labels) it received."""
    with ServerScorer(segment, precision=precision, label_smoothing=label_smoothing) as server:
        for acts in uploads:
            server.reply(acts)
    return server.scores()


def _modules(cands: Sequence[Candidate]) -> list[Candidate]:
    """Adaptable modules: the parts of a fused matrix merged back into one candidate."""
    merged: dict[str, Candidate] = {}
    for cand in cands:
        seen = merged.get(cand.module)
        d_out = cand.d_out + (seen.d_out if seen else 0)
        merged[cand.module] = Candidate(cand.module, cand.block, cand.d_in, d_out)
    return list(merged.values())


def fuse_parts(scores: Mapping[str, float], cands: Sequence[Candidate]) -> dict[str, float]:
    """Sensitivity per adaptable module: parts combined by size-weighted mean.

    That is s of the whole fused matrix (see the module docstring for why not sum or max);
    unfused matrices pass through unchanged.
    """
    sizes = {c.name: c.numel for c in cands}
    totals: dict[str, float] = {}
    weights: dict[str, int] = {}
    for name, value in scores.items():
        if name not in sizes:
            raise KeyError(f"score for {name!r} has no candidate; pass candidates(module) of "
                           "the module(s) that produced the scores")
        module = name.split(_PART_SEP, 1)[0]
        totals[module] = totals.get(module, 0.0) + value * sizes[name]
        weights[module] = weights.get(module, 0) + sizes[name]
    return {m: totals[m] / weights[m] for m in totals}


def relative_costs(cands: Sequence[Candidate]) -> dict[str, float]:
    """c(W) = (d_in + d_out) / mean over ``cands`` of (d_in + d_out): dimensionless."""
    if not cands:
        return {}
    mean = sum(c.cost for c in cands) / len(cands)
    return {c.name: c.cost / mean for c in cands}


def importance(
    scores: Mapping[str, float],
    cands: Sequence[Candidate],
    *,
    normalise: bool = True,
    fuse: bool = True,
) -> dict[str, float]:
    """I(W) = s(W) / c(W) per adaptable module (``fuse``) or per scored part.

    ``cands`` are the candidates behind ``scores`` (:func:`candidates`); the cost
    reference is their mean at the chosen level, so give whole blocks.
    """
    if fuse:
        scores, cands = fuse_parts(scores, cands), _modules(cands)
    if not normalise:
        return dict(scores)
    costs = relative_costs([c for c in cands if c.name in scores])
    missing = [n for n in scores if n not in costs]
    if missing:
        raise KeyError(f"no candidate for scores {missing[:3]}: pass candidates(module) of the "
                       "module(s) that produced the scores")
    return {name: value / costs[name] for name, value in scores.items()}


class ImportanceTracker:
    """Ī_t = β_t Ī_(t-1) + (1 - β_t) I_t across rounds; the first round is taken as is.

    Matrices measured for the first time start at their measurement; matrices not measured
    this round (a block that moved to another party) keep their history unchanged.
    """

    def __init__(
        self,
        beta: float = 0.8,  # hetero.ema_beta in the config
        *,
        adaptive: bool = False,
        beta_low: float = 0.5,
        beta_high: float = 0.95,
        half_change: float = 0.25,
    ) -> None:
        for field_name, value in (("beta", beta), ("beta_low", beta_low),
                                  ("beta_high", beta_high)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ImportanceTracker {field_name}={value}: must be in [0, 1)")
        if beta_low > beta_high:
            raise ValueError(f"ImportanceTracker beta_low={beta_low} > beta_high={beta_high}: "
                             "the adaptive range must be increasing")
        if not half_change > 0:
            raise ValueError(f"ImportanceTracker half_change={half_change}: must be > 0")
        self.beta = beta
        self.adaptive = adaptive
        self.beta_low = beta_low
        self.beta_high = beta_high
        self.half_change = half_change
        self.smoothed: dict[str, float] = {}
        self.rounds = 0
        self.last_change: float | None = None  # ρ of the last update with history
        self.last_beta: float | None = None  # β used by the last update with history

    def change(self, current: Mapping[str, float]) -> float:
        """Relative L1 fluctuation ρ of ``current`` against the history (shared keys)."""
        shared = [k for k in current if k in self.smoothed]
        moved = sum(abs(current[k] - self.smoothed[k]) for k in shared)
        scale = sum(abs(self.smoothed[k]) for k in shared)
        if scale == 0.0:
            return 0.0 if moved == 0.0 else math.inf
        return moved / scale

    def beta_for(self, change: float) -> float:
        """β for a fluctuation ρ: fixed, or β_low + (β_high - β_low) ρ_half / (ρ_half + ρ)."""
        if not self.adaptive:
            return self.beta
        return self.beta_low + (self.beta_high - self.beta_low) * (
            self.half_change / (self.half_change + change))

    def update(self, current: Mapping[str, float]) -> dict[str, float]:
        """Fold one round's importances in; returns the smoothed importances (a copy)."""
        beta = 0.0  # only used for keys with history
        if any(k in self.smoothed for k in current):
            self.last_change = self.change(current)
            self.last_beta = beta = self.beta_for(self.last_change)
        for name, value in current.items():
            previous = self.smoothed.get(name)
            self.smoothed[name] = (
                float(value) if previous is None else beta * previous + (1.0 - beta) * value
            )
        self.rounds += 1
        return dict(self.smoothed)

    # The history, for a run's checkpoint (the settings come from the config).
    _HISTORY = ("smoothed", "rounds", "last_change", "last_beta")

    def state_dict(self) -> dict[str, Any]:
        return {k: copy.copy(getattr(self, k)) for k in self._HISTORY}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in self._HISTORY:
            setattr(self, k, copy.copy(state[k]))


def ranking(scores: Mapping[str, float]) -> list[str]:
    """Names from most to least important; ties broken by name, so the order is stable."""
    return sorted(scores, key=lambda name: (-scores[name], name))


def global_importance_by_block(
    scores: Mapping[str, float], num_blocks: int | None = None
) -> list[float]:
    """Total importance per block (index = global block), for choosing split points.

    ``num_blocks`` sizes the list when the last blocks have no scores; blocks without
    scores count 0.
    """
    per_block: dict[int, float] = {}
    for name, value in scores.items():
        block = _block_of(name)
        per_block[block] = per_block.get(block, 0.0) + value
    size = max(per_block, default=-1) + 1 if num_blocks is None else num_blocks
    if per_block and max(per_block) >= size:
        raise ValueError(f"scores name block {max(per_block)} but num_blocks={num_blocks}")
    return [per_block.get(i, 0.0) for i in range(size)]


def _singular_values(g: torch.Tensor) -> torch.Tensor:
    """Descending singular values from the eigenvalues of the smaller Gram matrix: exact
    in float64 on that small matrix, and 2-3x faster than an SVD of ``g`` on CPU."""
    gram = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g
    eig = torch.linalg.eigvalsh(gram.double()).flip(0)
    return eig.clamp_min(0.0).sqrt()


def rank_energies(sigma: torch.Tensor, ranks: Sequence[int]) -> dict[int, float]:
    """``E(r) = sum_{i <= r} sigma_i^2`` for descending singular values ``sigma``; a rank
    beyond their number captures all of it."""
    energy = torch.cumsum(sigma.double() ** 2, 0)
    return {int(r): float(energy[min(int(r), len(energy)) - 1]) if r > 0 else 0.0
            for r in ranks}


def module_of(key: str) -> str:
    """The module an entry of an importance map is about: ``"<module>@<r>"`` or a plain
    module name (a sensitivity map)."""
    module, sep, rank = key.rpartition(_RANK_SEP)
    return module if sep and rank.isdigit() else key


def _split_key(key: str) -> tuple[str, int]:
    module, sep, rank = key.rpartition(_RANK_SEP)
    if not sep or not rank.isdigit():
        raise ValueError(f"{key!r} is not a gain entry '<module>{_RANK_SEP}<rank>'; importance "
                         "maps for the planner come from segment_importance / ServerScorer")
    return module, int(rank)


def rank_gains(flat: Mapping[str, float], ranks: Sequence[int]) -> dict[str, dict[int, float]]:
    """Module -> {rank: E(rank)} at the planner's ``ranks`` from a flat energy map: linear
    between measured ranks (a chord of a concave curve stays concave and below it), the
    largest measured value beyond them, 0 at rank 0."""
    measured: dict[str, dict[int, float]] = {}
    for key, value in flat.items():
        module, rank = _split_key(key)
        measured.setdefault(module, {0: 0.0})[rank] = max(float(value), 0.0)
    out = {}
    for module, curve in measured.items():
        known = sorted(curve)
        row = {}
        for r in ranks:
            hi = next((k for k in known if k >= r), None)
            if hi is None:
                row[r] = curve[known[-1]]
            elif hi == r:
                row[r] = curve[r]
            else:
                lo = max(k for k in known if k < r)
                row[r] = curve[lo] + (curve[hi] - curve[lo]) * (r - lo) / (hi - lo)
        out[module] = row
    return out


def module_energy(flat: Mapping[str, float]) -> dict[str, float]:
    """Module -> its largest measured energy: one importance number per matrix (ranking,
    re-planning, equal-rank placement)."""
    best: dict[str, tuple[int, float]] = {}
    for key, value in flat.items():
        module, rank = _split_key(key)
        if module not in best or rank > best[module][0]:
            best[module] = (rank, float(value))
    return {m: v for m, (_, v) in best.items()}
