"""Per-step memory, FLOPs, bytes on the wire and latency of a split LoRA step, from a config.

Everything here is arithmetic on a Hugging Face config (:class:`ModelDims`) and a
:class:`Workload` (batch, sequence length, dtype sizes); no model is built. A LoRA plan is
a ``dict`` from the unsplit model's module name (``model.layers.3.self_attn.q_proj``) to a
rank, 0 or absent meaning no adapter. Functions about the client read only the plan's
entries in blocks ``[0, cut)``, those about the server only blocks ``[cut, L)``.

**Frozen weights.** Exactly the parameters the segments of
:func:`hsplitlora.models.split.split_model` hold, times ``weight_bytes``. The client holds
the embeddings (GPT-2: token and position), blocks ``[0, cut)`` and the final norm (never
run there: the client stops at its first missing block, but NanoChat also runs that norm
before its blocks). The server holds blocks ``[cut, L)``, the final norm, the LM head and *also the
input embeddings*, because ``split_model`` copies the whole backbone (for tied models the
embedding matrix is the LM head anyway). Buffers (rotary tables) are not counted.

**Activations** are the bytes autograd keeps for backward, modelled per block for the
fused attention kernel (SDPA flash / memory-efficient, the transformers default) and
checked on CPU with ``torch.autograd.graph.saved_tensors_hooks`` (unique storages,
parameters excluded). With N = batch x seq tokens and ``a`` = activation bytes:

* each norm whose input needs a gradient: its input in fp32 (RMSNorm computes in fp32;
  so does LayerNorm under CUDA autocast, while CPU autocast keeps it in bf16, which makes
  GPT-2 under bf16 on CPU an over-estimate by 4-9 %) plus per-token statistics;
* attention: q, k, v after rotary (with padding, transformers repeats GQA keys/values to
  all heads before SDPA, so k and v count at ``n_heads``; without padding at
  ``n_kv_heads``), the output, the fp32 log-sum-exp per head and, with padding, a
  ``[b, 1, s, s]`` mask per block in the activation dtype; Qwen3's q/k norms add their
  fp32 inputs;
* MLP: gated MLPs keep gate, up and act(gate) (3 x ``[N, intermediate]``); GPT-2's
  ``gelu_new`` keeps 4 intermediates, an ``F.gelu``-style activation 1;
* GPT-2 residual dropout (``resid_pdrop > 0``): two masks of ``[N, d]`` in the activation
  dtype (CPU stores masks in the input dtype; CUDA stores bool, so this over-counts there);
* per adapter: the LoRA-A output ``[N, r]`` and the adapter's input. In fp32 without LoRA
  dropout, adapters reading the same tensor share it (q/k/v the first norm's output,
  gate/up the second's, o the attention output that SDPA keeps anyway, down the MLP
  product). Under autocast (activations narrower than the fp32 adapters) peft casts the
  input to fp32 and autocast back, so each adapter keeps its own copy, plus bf16 copies
  of B and (where its input needs a gradient) A. With LoRA dropout each adapter keeps
  its dropped-out copy and, when its input needs a gradient, the mask (in the adapters'
  dtype: the cast comes before dropout);
* once per segment: the rotary cos/sin tables ``[1, 1, s, head_dim]``.

Beside what autograd saves, each party holds the hidden state ``[b, s, d]`` that crosses
the cut (``MemoryBreakdown.exchanged``): the client its output until the gradient
returns, the server its received input.

A frozen linear layer keeps nothing (its weight is a parameter). The gradient starts at
the client's earliest adapter: blocks before its block run forward only and keep nothing,
and inside that block only what is computed from the earliest adapted stage on is kept
(stages in block order: attention input, attention output, MLP input, MLP product). The
whole stage is counted even when only some of its matrices carry adapters, an
over-estimate (measured +15 % for a single ``up_proj`` adapter in the first block). A
client with no adapter keeps nothing at all. The server's input always needs a gradient
(the client waits for it), and the server also keeps the final norm's input, the fp32
log-probabilities ``[b, s-1, vocab]`` of the cross-entropy and the int64 targets.

Measured on tiny Llama/Qwen2/Mistral/GPT-2 models (CPU, fp32 and bf16 autocast, with and
without LoRA dropout, tests/hetero/test_costmodel.py) and on SmolLM2-135M
(bench/costmodel_check.py): exact for the Llama family and for GPT-2 in fp32, never an
under-estimate; GPT-2 under bf16 on CPU over-estimates by 4-9 % (LayerNorm, above), and
a first adapted block with only part of a stage adapted by up to ~15 %. Gemma, Gemma 2
and Qwen3 follow the same rules from their configs but only their parameter counts are
tested (Gemma 2 defaults to eager attention, which keeps the s x s probabilities too).

Two deliberate upper bounds. The LM head and its log-probabilities are costed at every
position, while training runs the head on target positions only
(:func:`hsplitlora.runtime.optim.target_logits`; on E2E about half of them), so server
FLOPs and memory are over-estimated by up to that share of the head. And the model
assumes a fused attention kernel (SDPA, what CUDA runs); training on CPU uses eager
attention (``model.attention: auto``, chosen for speed there), which also keeps the
``[b, heads, s, s]`` probabilities: the host's own memory is not what the planner
budgets, the simulated devices' is.

Not modelled: transient peaks (logits, the fp32 copy of the logits, gradient buffers
during backward), allocator fragmentation, CUDA context and workspace, attention
dropout, and the bf16 weight copies autocast would keep if fp32 base weights ran under
bf16 autocast (``model.dtype: auto`` avoids that case). Treat the result as an estimate.

**Exact merges.** With a merging aggregator (noise-free, stacking) every candidate
weight a party holds also keeps its pre-merge copy and the fp32 sum of merged updates
(``Workload.merge_bytes``, counted with the frozen weights): the price of exact merges
beside a bf16 base.

**LoRA state.** Adapter weights, their gradients and AdamW's two moments, all in
``lora_bytes`` (fp32): ``(2 + adam_states) x r x (d_in + d_out) x lora_bytes`` per matrix.

**FLOPs** count matmuls only, ``2 m n k`` each, as ``torch.utils.flop_counter`` does:
every linear of a block, attention's ``Q K^T`` and ``A V`` over the full ``s x s`` square
(kernels skip the masked half, counters do not), the LM head, and LoRA's two thin matmuls
``2 N r (d_in + d_out)``. Norms, activations, softmax and rotary are elementwise and
ignored (a few per cent at d >= 512). Backward: a frozen linear needs only its input
gradient (1x its forward), attention 2x its forward (dQ, dK, dV, dP), an adapter 2x its
forward (weight and input gradients of A and B). Blocks before the client's first adapted
block need no backward; in that block, matrices reading an activation at or before the
earliest adapted stage need no input gradient, nor does the earliest adapter, nor
attention when the earliest adapter comes after it (attention's backward is still counted
whole when only some of q, k, v are adapted). The server always back-propagates to its
input, LM head included. Forward counts match ``FlopCounterMode`` exactly on tiny models
with eager attention (CPU SDPA is invisible to the counter), and so do backward counts
whenever the client's first adapted block adapts all of q, k, v or none of them.

**Bytes on the wire** per step, as :class:`hsplitlora.roles.messages.Activations` sends
them: up, the hidden states ``[b, s, d]`` in the activation dtype plus the int64 attention
mask and labels ``[b, s]``; down, the activation gradient ``[b, s, d]``.

**U-shaped split** (``tail`` blocks kept by the client): the client also holds blocks
``[L - tail, L)``, the final norm, the LM head and the loss, costed as the server segment
is (their input needs a gradient) but without a second copy of the embeddings; the server
holds blocks ``[cut, L - tail)`` over its copy of the backbone, keeps its output until the
tail's gradient returns, and computes no head. Up: hidden states and mask (no labels),
then the tail's gradient; down: the activations at ``L - tail``, then the gradient at the
cut.

**Step latency** (:func:`step_time`) is sequential: client compute, upload, server
compute, download. Compute time is FLOPs over the device's sustained FLOP/s; a transfer
runs at the slower end of the link (``min(client uplink, server downlink)`` up and the
reverse down). The server is assumed to serve this client alone; queueing behind other
clients, network latency and the optimizer step (elementwise) are left to the simulated
clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from hsplitlora.hetero.profiles import DeviceProfile
from hsplitlora.models.structure import STAGES, Matrix, arch_spec

__all__ = [
    "Flops",
    "Matrix",
    "MemoryBreakdown",
    "ModelDims",
    "StepTime",
    "Workload",
    "activation_bytes",
    "adapter_bytes",
    "block_flops",
    "bytes_down",
    "bytes_up",
    "client_flops",
    "client_memory",
    "lora_flops_per_rank",
    "lora_memory_per_rank",
    "server_flops",
    "server_memory",
    "step_time",
]

_INT64 = 8
_FP32 = 4


@dataclass(frozen=True)
class Workload:
    """What one step processes and in which dtypes."""

    batch: int
    seq: int
    weight_bytes: int = 2  # frozen base weights (bf16)
    act_bytes: int = 2  # activations and the tensors sent (bf16 autocast)
    lora_bytes: int = 4  # LoRA weights and gradients: peft keeps adapters in fp32
    adam_states: int = 2  # AdamW's exp_avg and exp_avg_sq, in the adapters' dtype
    lora_dropout: float = 0.0  # > 0: every adapter keeps its own dropped-out input
    # Merging aggregators keep, per element of every candidate weight a party holds, the
    # weight as loaded and the fp32 sum of merged updates (hsplitlora.models.shared):
    # weight_bytes + 4 there, 0 otherwise.
    merge_bytes: int = 0
    padded: bool = True  # batches carry padding, so attention gets an explicit mask
    # Frozen linear weights of the client's blocks (the server's): bf16/fp32 as
    # weight_bytes, or bitsandbytes int8 / NF4 (models/quantize.py), see linear_bytes.
    quantization: Literal["none", "int8", "int4"] = "none"
    server_quantization: Literal["none", "int8", "int4"] = "none"

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq < 2:
            raise ValueError(f"a step needs batch >= 1 and seq >= 2 (the loss shifts by one "
                             f"token); got batch {self.batch}, seq {self.seq}")

    @classmethod
    def for_precision(cls, precision: str, batch: int, seq: int, *,
                      weight_bytes: int | None = None, **kw: Any) -> Workload:
        """``bf16`` (bf16 weights under bf16 autocast) or ``fp32`` sizes; ``weight_bytes``
        is the frozen weights' storage size when it differs (fp32 weights under bf16)."""
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
        size = 2 if precision == "bf16" else 4
        return cls(batch=batch, seq=seq, weight_bytes=weight_bytes or size, act_bytes=size, **kw)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


# The activations a block's matrices read, in the order the block computes them.
_STAGES = STAGES

@dataclass(frozen=True)
class ModelDims:
    """The shapes the cost model needs, read from a transformers config."""

    model_type: str
    block_prefix: str  # "model.layers": module names are f"{block_prefix}.{i}.{path}"
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    n_positions: int  # learned position embeddings (GPT-2); 0 for rotary models
    tied_embeddings: bool
    matrices: tuple[Matrix, ...]  # every linear layer of a block, in block order
    candidates: tuple[Matrix, ...]  # those that may carry LoRA (the planner's choice set)
    block_params: int  # all parameters of one block
    norm: Literal["rms", "layer"]
    norms_per_block: int
    qk_norm: bool  # Qwen3 normalises q and k per head
    mlp_saved: int  # [N, intermediate] tensors the MLP nonlinearity keeps for backward
    resid_dropout: float
    rotary: bool

    embed_params: int = 0  # what the backbone holds besides blocks and final norm
    final_norm_params: int = 0
    head_param_count: int = 0  # the head's own parameters (0 when tied)

    @classmethod
    def from_config(cls, config: Any, targets: Iterable[str] | None = None) -> ModelDims:
        """Dimensions of a config, read off the structure :func:`arch_spec` discovers (the
        same the split uses); ``targets`` (block-relative suffixes as in
        :class:`~hsplitlora.models.lora.LoraSettings`) picks the candidate matrices, all
        of the architecture's targetable ones when ``None``."""
        spec = arch_spec(config)
        if spec.streams > 1:
            raise ValueError(
                f"{spec.model_type} sends {spec.streams} residual streams across a cut "
                "(hyper-connections), but the cost model counts one hidden state per token "
                "in activation memory and on the wire; train it with a uniform split "
                "(homogeneous SplitLoRA) or extend hsplitlora.hetero.costmodel")
        if not spec.uniform:
            raise ValueError(
                f"the cost model assumes identical blocks, but {spec.model_type}'s blocks "
                "differ (a mixture-of-experts or hybrid layer pattern); plan it with a "
                "uniform split or extend hsplitlora.hetero.costmodel to per-block matrices")
        d = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or d // heads)
        gated = any(m.kind in ("gate", "gate_up") for m in spec.matrices)
        up = next((m for m in spec.matrices if m.reads == "mlp_mid"), None)
        inner = up.d_in if up is not None else int(getattr(config, "intermediate_size", 4 * d))
        activation = str(getattr(config, "activation_function", ""))
        block_norms = [n for n in spec.block_norms if n.count(".") == 0]
        return cls(
            model_type=spec.model_type,
            block_prefix=spec.block_prefix,
            n_layers=int(getattr(config, spec.n_layers)),
            hidden=d,
            intermediate=inner,
            n_heads=heads,
            n_kv_heads=kv,
            head_dim=head_dim,
            vocab=int(config.vocab_size),
            n_positions=spec.positions,
            tied_embeddings=spec.head_params == 0,
            matrices=spec.matrices,
            candidates=_select(spec.matrices, spec.targets if targets is None
                               else tuple(targets)),
            block_params=spec.block_params[0] if spec.block_params else 0,
            norm="layer" if spec.norm == "layer" else "rms",
            norms_per_block=len(block_norms),
            qk_norm=len(spec.block_norms) > len(block_norms),
            mlp_saved=3 if gated else (4 if activation == "gelu_new" else 1),
            resid_dropout=float(getattr(config, "resid_pdrop", 0.0) or 0.0),
            rotary=spec.positions == 0,
            embed_params=spec.shell_params - spec.final_norm_params,
            final_norm_params=spec.final_norm_params,
            head_param_count=spec.head_params,
        )

    @property
    def norm_params(self) -> int:
        return self.final_norm_params

    @property
    def embedding_params(self) -> int:
        """Everything the backbone holds outside its blocks and final norm (token and
        position embeddings), as the discovered structure counts it."""
        return self.embed_params

    @property
    def head_params(self) -> int:
        """The LM head's own parameters: none when tied to the embeddings."""
        return self.head_param_count

    @property
    def params(self) -> int:
        """Parameters of the unsplit model (tied weights counted once)."""
        return (self.embedding_params + self.n_layers * self.block_params + self.norm_params
                + self.head_params)

    def module_name(self, block: int, matrix: Matrix) -> str:
        return f"{self.block_prefix}.{block}.{matrix.path}"

    def candidate_modules(self, blocks: Iterable[int] | None = None) -> dict[str, Matrix]:
        """Full module name -> matrix for the candidates of ``blocks`` (default: all)."""
        chosen = range(self.n_layers) if blocks is None else blocks
        return {self.module_name(b, m): m for b in chosen for m in self.candidates}

    def locate(self, name: str) -> tuple[int, Matrix]:
        """Block index and matrix of a full module name, or a KeyError saying what is valid."""
        prefix = self.block_prefix + "."
        index, _, path = name.removeprefix(prefix).partition(".")
        if name.startswith(prefix) and index.isdigit() and int(index) < self.n_layers:
            for m in (*self.matrices, *self.candidates):
                if m.path == path:
                    return int(index), m
            if ":" in path:  # a part of a fused matrix, candidate or not
                with contextlib.suppress(ValueError):
                    return int(index), _select(self.matrices, (path,))[0]
        raise KeyError(
            f"{name!r} is not a linear layer of this {self.model_type} model: expected "
            f"'{prefix}<0..{self.n_layers - 1}>.<{'|'.join(m.path for m in self.matrices)}>'"
        )


def _select(matrices: tuple[Matrix, ...], targets: tuple[str, ...]) -> tuple[Matrix, ...]:
    """The candidate matrices ``targets`` select; ``attn.c_attn:q`` selects a part of a fused
    matrix as a candidate of its own (its rows, read from the same activation)."""
    def hit(m: Matrix, t: str) -> bool:
        return m.path == t or m.path.endswith("." + t)

    def find(t: str) -> list[Matrix]:
        path, _, label = t.partition(":")
        found = [m for m in matrices if hit(m, path)]
        if not label:
            return found
        return [dataclasses.replace(m, path=f"{m.path}:{p.label}", kind=p.label,
                                    d_out=p.width, bias=False, parts=())
                for m in found for p in m.parts if p.label == label]

    unknown = [t for t in targets if not find(t)]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}: this architecture's block matrices are "
                         f"{[m.path for m in matrices]}")
    chosen = {m.path: m for t in targets for m in find(t)}
    order = [m.path for m in matrices]
    return tuple(sorted(chosen.values(),
                        key=lambda m: (order.index(m.path.partition(":")[0]), m.path)))


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes one party holds during a step.

    ``exchanged`` is the hidden state ``[b, s, d]`` a party holds across the step that
    autograd does not save: the client's output, sent and kept until its gradient returns
    (the root of its backward), and the server's received input, whose gradient it
    returns. Measured on SmolLM2-135M it was the whole gap between this model's client
    peak and the measured one (bench/quantization.py).
    """

    frozen_weights: int
    activations: int
    lora_weights: int
    lora_grads: int
    optimizer: int
    exchanged: int = 0

    @property
    def total(self) -> int:
        return (self.frozen_weights + self.activations + self.lora_weights + self.lora_grads
                + self.optimizer + self.exchanged)


@dataclass(frozen=True)
class Flops:
    """Matmul FLOPs of one step."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


@dataclass(frozen=True)
class StepTime:
    """Seconds of one sequential split step."""

    client_compute: float
    upload: float
    server_compute: float
    download: float

    @property
    def total(self) -> float:
        return self.client_compute + self.upload + self.server_compute + self.download


def _adapted(
    dims: ModelDims, ranks: Mapping[str, int], blocks: range
) -> dict[int, dict[Matrix, int]]:
    """Block -> {matrix: rank > 0} for the plan entries inside ``blocks``."""
    out: dict[int, dict[Matrix, int]] = {}
    for name, rank in ranks.items():
        block, matrix = dims.locate(name)
        if rank < 0:
            raise ValueError(f"rank of {name} is {rank}; ranks must be >= 0")
        if rank > 0 and block in blocks:
            out.setdefault(block, {})[matrix] = int(rank)
    return out


def _block_saved(dims: ModelDims, work: Workload, grad_from: int) -> int:
    """Bytes one block keeps for backward, adapters aside (see the module docstring).

    ``grad_from`` is -1 when the block's input needs a gradient, else the stage index of
    its earliest adapter: only what is computed from that stage on is kept.
    """
    n, a = work.tokens, work.act_bytes
    norm = n * (_FP32 * dims.hidden + (8 if dims.norm == "layer" else 4))
    # A norm is kept when its input needs a gradient: the block input (-1), the residual
    # after attention (1: o or anything before it adapted), the MLP output (3).
    levels = (-1, 1) if dims.norms_per_block == 2 else (-1, 1, 1, 3)
    kept = sum(norm for level in levels if grad_from <= level)
    if grad_from <= 0:
        kv_kept = dims.n_heads if work.padded else dims.n_kv_heads
        kept += (
            n * a * dims.head_dim * (2 * dims.n_heads + 2 * kv_kept)  # q, k, v and output
            + n * _FP32 * dims.n_heads  # log-sum-exp
            + (n * work.seq * a if work.padded else 0)  # [b, 1, s, s] mask
        )
        if dims.qk_norm:
            kept += n * _FP32 * (dims.n_heads + dims.n_kv_heads) * (dims.head_dim + 1)
    if grad_from <= 2:
        kept += n * a * dims.intermediate * dims.mlp_saved
    if dims.resid_dropout > 0:  # masks after attention and after the MLP
        kept += n * a * dims.hidden * ((grad_from <= 1) + 1)
    return kept


def _read_bytes(dims: ModelDims, work: Workload, reads: str, grad_from: int) -> int:
    """Bytes of the activation a group of adapters reads, when nothing else keeps it."""
    if reads == "attn_out" and grad_from <= 0:
        return 0  # the attention output: SDPA keeps it already
    width = dims.n_heads * dims.head_dim if reads == "attn_out" else (
        dims.intermediate if reads == "mlp_mid" else dims.hidden)
    return work.tokens * width * work.act_bytes


def _lora_saved(
    dims: ModelDims,
    work: Workload,
    adapted: Mapping[Matrix, int],
    reserve: Iterable[Matrix],
    grad_from: int,
) -> int:
    """Bytes adapters add to a block: their A outputs and the inputs they read.

    ``reserve`` lists matrices whose input is counted as if they carried an adapter (the
    planner's reservation); their A outputs are not.
    """
    n, a = work.tokens, work.act_bytes
    kept = sum(n * r * a for r in adapted.values())  # A outputs
    if _autocast(work):  # autocast's copies of B, and of A where its input needs a gradient
        kept += sum(r * (m.d_out + (m.d_in if _input_grad(m, grad_from) else 0)) * a
                    for m, r in adapted.items())
    readers = set(adapted) | set(reserve)
    if work.lora_dropout > 0:
        # peft casts the input to the adapters' dtype before dropout: the mask is in that
        # dtype (kept only if the input needs a gradient), the copy A reads in the
        # activation dtype
        kept += sum(n * m.d_in * (a + (work.lora_bytes if _input_grad(m, grad_from) else 0))
                    for m in readers)
    elif _autocast(work):
        kept += sum(n * m.d_in * a for m in readers)  # each adapter's own cast copy
    else:
        kept += sum(_read_bytes(dims, work, reads, grad_from)
                    for reads in {m.reads for m in readers})
    return kept


def _input_grad(matrix: Matrix, grad_from: int) -> bool:
    """Whether the activation ``matrix`` reads needs a gradient in a block whose gradient
    starts at stage ``grad_from``."""
    return _STAGES.index(matrix.reads) > grad_from


def _autocast(work: Workload) -> bool:
    """Activations narrower than the adapters: the step runs under autocast."""
    return work.act_bytes < work.lora_bytes


def _earliest_stage(adapted: Iterable[Matrix]) -> int:
    return min((_STAGES.index(m.reads) for m in adapted), default=0)


def activation_bytes(
    dims: ModelDims,
    blocks: range,
    ranks: Mapping[str, int],
    work: Workload,
    *,
    input_grad: bool,
    reserve_inputs: bool = False,
) -> int:
    """Bytes a run of blocks keeps for backward when the gradient flows through all of them.

    ``input_grad`` says whether the first block's input needs a gradient (server: yes;
    client: no, it comes from frozen layers, so that block keeps only what its earliest
    adapter feeds). ``reserve_inputs`` counts the input of every candidate matrix as if
    adapted and assumes the first block's earliest adapter reads the block's first
    activation: an upper bound for any plan over these blocks, additive in ranks, which is
    what the planner budgets with.
    """
    if not blocks:
        return 0
    adapted = _adapted(dims, ranks, blocks)
    reserve = dims.candidates if reserve_inputs else ()
    total = 2 * work.seq * dims.head_dim * work.act_bytes if dims.rotary else 0  # cos, sin
    for block in blocks:
        own = adapted.get(block, {})
        first = block == blocks[0] and not input_grad
        grad_from = _earliest_stage(() if reserve_inputs else own) if first else -1
        total += _block_saved(dims, work, grad_from)
        total += _lora_saved(dims, work, own, reserve, grad_from)
    return total


def lora_memory_per_rank(matrix: Matrix, work: Workload) -> int:
    """Bytes one rank of an adapter on ``matrix`` costs in a step: its weights, gradients
    and AdamW moments, its A output kept for backward and, under autocast, its
    low-precision copies of A and B (the input it reads is not included)."""
    state = matrix.lora_params(1) * work.lora_bytes * (2 + work.adam_states)
    copies = matrix.lora_params(1) * work.act_bytes if _autocast(work) else 0
    return state + copies + work.tokens * work.act_bytes


def lora_flops_per_rank(matrix: Matrix, work: Workload) -> Flops:
    """FLOPs one rank of an adapter on ``matrix`` adds to a step."""
    forward = 2 * work.tokens * matrix.lora_params(1)
    return Flops(forward, 2 * forward)


def _linear_flops(matrices: Iterable[Matrix], work: Workload) -> int:
    return 2 * work.tokens * sum(m.d_in * m.d_out for m in matrices)


def _attention_flops(dims: ModelDims, work: Workload) -> int:
    """``Q K^T`` and ``A V`` over the full s x s square, for every query head."""
    return 2 * 2 * work.tokens * work.seq * dims.n_heads * dims.head_dim


def block_flops(dims: ModelDims, work: Workload) -> Flops:
    """FLOPs of one block without adapters; backward as when the gradient flows through."""
    linear, attention = _linear_flops(dims.matrices, work), _attention_flops(dims, work)
    return Flops(linear + attention, linear + 2 * attention)


def _lora_state(
    adapted: Mapping[int, Mapping[Matrix, int]], work: Workload
) -> tuple[int, int, int]:
    params = sum(m.lora_params(r) for block in adapted.values() for m, r in block.items())
    weights = params * work.lora_bytes
    return weights, weights, weights * work.adam_states


def _candidate_params(dims: ModelDims) -> int:
    """Weight elements of one block's candidate matrices (what a merge may touch)."""
    return sum(m.d_in * m.d_out for m in dims.candidates)


def _first_adapted(adapted: Mapping[int, Mapping[Matrix, int]], cut: int) -> int:
    return min(adapted, default=cut)


_NF4_BLOCK = 64  # weights per fp32 absmax (models/quantize.py: NF4_BLOCK)
_NF4_CODE = 16 * _FP32  # each NF4 layer keeps its own 16-value code book


def linear_bytes(d_out: int, d_in: int, quantization: str, weight_bytes: int) -> int:
    """Stored bytes of one frozen weight matrix: ``weight_bytes`` per weight, or int8 with
    one fp32 scale per output row, or NF4 (two weights a byte) with one fp32 absmax per
    64 weights and a code book; exactly what bitsandbytes keeps (tested)."""
    n = d_out * d_in
    if quantization == "int8":
        return n + _FP32 * d_out
    if quantization == "int4":
        return (n + 1) // 2 + _FP32 * -(-n // _NF4_BLOCK) + _NF4_CODE
    return n * weight_bytes


def block_weight_bytes(dims: ModelDims, weight_bytes: int, quantization: str = "none") -> int:
    """Frozen bytes of one block: its matrices as :func:`linear_bytes` stores them, its
    biases and norms in the base dtype."""
    matrices = sum(linear_bytes(m.d_out, m.d_in, quantization, weight_bytes)
                   for m in dims.matrices)
    rest = dims.block_params - sum(m.d_out * m.d_in for m in dims.matrices)
    return matrices + rest * weight_bytes


def _check_cut(dims: ModelDims, cut: int, tail: int = 0) -> None:
    if not 0 <= cut <= dims.n_layers:
        raise ValueError(f"cut {cut} is out of range: this model has {dims.n_layers} blocks, "
                         f"so the cut must be in [0, {dims.n_layers}]")
    if tail and not 0 < tail < dims.n_layers - cut:
        raise ValueError(f"tail {tail} with cut {cut} leaves the server no block: this model "
                         f"has {dims.n_layers} blocks, so the tail must be in "
                         f"[1, {dims.n_layers - cut - 1}]")


def _plus(a: MemoryBreakdown, b: MemoryBreakdown) -> MemoryBreakdown:
    return MemoryBreakdown(*(getattr(a, f.name) + getattr(b, f.name)
                             for f in dataclasses.fields(MemoryBreakdown)))


def _received_memory(dims: ModelDims, start: int, stop: int, ranks: Mapping[str, int],
                     work: Workload, quantization: str) -> MemoryBreakdown:
    """Blocks ``[start, stop)`` run on received activations (their input needs a gradient),
    and where ``stop`` is ``L`` the final norm, the LM head and the loss: the server
    segment, a U-shaped server's middle or a U-shaped client's tail, without the
    embeddings (the party holding them counts them once)."""
    adapted = _adapted(dims, ranks, range(start, stop))
    weights, grads, optimizer = _lora_state(adapted, work)
    saved = activation_bytes(dims, range(start, stop), ranks, work, input_grad=True)
    head = 0
    if stop == dims.n_layers:
        n, targets = work.tokens, work.batch * (work.seq - 1)
        saved += (n * (_FP32 * dims.hidden + (8 if dims.norm == "layer" else 4))  # final norm
                  + targets * (_FP32 * dims.vocab + _INT64) + _FP32)  # log-probs, targets
        head = dims.head_params * work.weight_bytes
    blocks = stop - start
    return MemoryBreakdown(
        frozen_weights=(head + blocks * block_weight_bytes(dims, work.weight_bytes, quantization)
                        + blocks * _candidate_params(dims) * work.merge_bytes),
        activations=saved,
        lora_weights=weights,
        lora_grads=grads,
        optimizer=optimizer,
        # the received input; a middle also keeps its output until the tail's gradient
        exchanged=_hidden_bytes(dims, work) * (1 if stop == dims.n_layers else 2),
    )


def client_memory(
    dims: ModelDims, cut: int, ranks: Mapping[str, int], work: Workload, tail: int = 0
) -> MemoryBreakdown:
    """Memory of the client segment (embeddings + blocks ``[0, cut)``) for one step, and of
    a U-shaped client's tail (blocks ``[L - tail, L)``, final norm, LM head, loss)."""
    _check_cut(dims, cut, tail)
    adapted = _adapted(dims, ranks, range(cut))
    first = _first_adapted(adapted, cut)
    weights, grads, optimizer = _lora_state(adapted, work)
    own = MemoryBreakdown(
        frozen_weights=((dims.embedding_params + dims.norm_params) * work.weight_bytes
                        + cut * block_weight_bytes(dims, work.weight_bytes, work.quantization)
                        + cut * _candidate_params(dims) * work.merge_bytes),
        activations=activation_bytes(dims, range(first, cut), ranks, work, input_grad=False),
        lora_weights=weights,
        lora_grads=grads,
        optimizer=optimizer,
        exchanged=_hidden_bytes(dims, work) if cut < dims.n_layers else 0,
    )
    if not tail:
        return own
    n = dims.n_layers
    return _plus(own, _received_memory(dims, n - tail, n, ranks, work, work.quantization))


def server_memory(
    dims: ModelDims, cut: int, ranks: Mapping[str, int], work: Workload, tail: int = 0
) -> MemoryBreakdown:
    """Memory of the server segment (blocks ``[cut, L)``, final norm, LM head, loss), or of
    a U-shaped server's middle (blocks ``[cut, L - tail)``)."""
    _check_cut(dims, cut, tail)
    segment = _received_memory(dims, cut, dims.n_layers - tail, ranks, work,
                               work.server_quantization)
    # split_model copies the whole backbone: the embeddings and final norm come along
    embeddings = (dims.embedding_params + dims.norm_params) * work.weight_bytes
    return dataclasses.replace(segment, frozen_weights=segment.frozen_weights + embeddings)


def _hidden_bytes(dims: ModelDims, work: Workload) -> int:
    """One ``[b, s, d]`` hidden state in the activation dtype (what crosses the cut)."""
    return work.tokens * dims.hidden * work.act_bytes


def _lora_flops(adapted: Mapping[int, Mapping[Matrix, int]], work: Workload) -> Flops:
    fwd = sum(r * lora_flops_per_rank(m, work).forward
              for block in adapted.values() for m, r in block.items())
    return Flops(fwd, 2 * fwd)


def _frontier_saving(dims: ModelDims, adapted: Mapping[Matrix, int], work: Workload) -> int:
    """Backward FLOPs the client's first adapted block skips: the input gradients of every
    matrix reading an activation at or upstream of its earliest adapter's input (those
    need none), attention's backward when that adapter comes after attention."""
    earliest = _earliest_stage(adapted)
    skipped = [m for m in dims.matrices if _STAGES.index(m.reads) <= earliest]
    lora_inputs = sum(r * m.d_in for m, r in adapted.items()
                      if _STAGES.index(m.reads) == earliest)
    attention = 2 * _attention_flops(dims, work) if earliest > 0 else 0
    return _linear_flops(skipped, work) + 2 * work.tokens * lora_inputs + attention


def _received_flops(dims: ModelDims, start: int, stop: int, ranks: Mapping[str, int],
                    work: Workload) -> Flops:
    """Blocks ``[start, stop)`` back-propagated to their input, and the LM head where
    ``stop`` is ``L`` (see :func:`_received_memory`)."""
    adapted = _adapted(dims, ranks, range(start, stop))
    block, lora = block_flops(dims, work), _lora_flops(adapted, work)
    head = 2 * work.tokens * dims.hidden * dims.vocab if stop == dims.n_layers else 0
    blocks = stop - start
    return Flops(blocks * block.forward + head + lora.forward,
                 blocks * block.backward + head + lora.backward)


def client_flops(dims: ModelDims, cut: int, ranks: Mapping[str, int], work: Workload,
                 tail: int = 0) -> Flops:
    """FLOPs of the client's forward and backward over blocks ``[0, cut)``, and over a
    U-shaped client's tail and LM head."""
    _check_cut(dims, cut, tail)
    adapted = _adapted(dims, ranks, range(cut))
    block, lora = block_flops(dims, work), _lora_flops(adapted, work)
    first = _first_adapted(adapted, cut)
    backward = (cut - first) * block.backward + lora.backward
    if adapted:
        backward -= _frontier_saving(dims, adapted[first], work)
    own = Flops(cut * block.forward + lora.forward, backward)
    if not tail:
        return own
    rest = _received_flops(dims, dims.n_layers - tail, dims.n_layers, ranks, work)
    return Flops(own.forward + rest.forward, own.backward + rest.backward)


def server_flops(dims: ModelDims, cut: int, ranks: Mapping[str, int], work: Workload,
                 tail: int = 0) -> Flops:
    """FLOPs of the server's forward and backward: blocks ``[cut, L)`` and the LM head, or
    a U-shaped server's middle blocks ``[cut, L - tail)``."""
    _check_cut(dims, cut, tail)
    return _received_flops(dims, cut, dims.n_layers - tail, ranks, work)


def bytes_up(batch: int, seq: int, hidden: int, act_bytes: int, tail: int = 0) -> int:
    """Bytes a client uploads per step: hidden states, int64 attention mask and labels; a
    U-shaped client sends no labels but the gradient at its tail."""
    if tail:
        return batch * seq * (2 * hidden * act_bytes + _INT64)
    return batch * seq * (hidden * act_bytes + 2 * _INT64)


def bytes_down(batch: int, seq: int, hidden: int, act_bytes: int, tail: int = 0) -> int:
    """Bytes the server sends back per step: the activation gradient, and to a U-shaped
    client first the activations at its tail."""
    return batch * seq * hidden * act_bytes * (2 if tail else 1)


def adapter_bytes(dims: ModelDims, ranks: Mapping[str, int], work: Workload) -> int:
    """Bytes of the A and B matrices of a plan, as they travel to aggregation."""
    adapted = _adapted(dims, ranks, range(dims.n_layers))
    return _lora_state(adapted, work)[0]


def step_time(
    client: DeviceProfile,
    server: DeviceProfile,
    dims: ModelDims,
    cut: int,
    client_ranks: Mapping[str, int],
    server_ranks: Mapping[str, int],
    work: Workload,
    tail: int = 0,
) -> StepTime:
    """Latency of one sequential step: client compute, upload, server compute, download
    (a U-shaped step's two transfers each way, and its tail's compute, included)."""
    up = bytes_up(work.batch, work.seq, dims.hidden, work.act_bytes, tail)
    down = bytes_down(work.batch, work.seq, dims.hidden, work.act_bytes, tail)
    return StepTime(
        client_compute=client_flops(dims, cut, client_ranks, work, tail).total / client.flops,
        upload=up / min(client.uplink_bps, server.downlink_bps),
        server_compute=server_flops(dims, cut, server_ranks, work, tail).total / server.flops,
        download=down / min(server.uplink_bps, client.downlink_bps),
    )
