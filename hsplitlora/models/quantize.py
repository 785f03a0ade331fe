"""Quantised frozen base weights (``model.quantization``): int8 or 4-bit NF4 linear
layers of bitsandbytes in the blocks a party holds, LoRA trained on top (QLoRA).

bitsandbytes because it was the one library measured here whose quantised layers run
forward and backward on CPU and on CUDA without a build step, and that PEFT attaches
LoRA to as it stands (FlowerTune and OpenFedLLM load their 4-bit bases with it);
optimum-quanto compiled a C++ extension for 3 minutes on first int4 use, and torchao's
int4 layouts need CUDA kernels (docs/quantization.md has the figures).
Embeddings, norms and biases stay in the base dtype, as QLoRA keeps them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from hsplitlora.errors import UserError
from hsplitlora.models.split import arch_spec

__all__ = ["NF4_BLOCK", "Quantization", "QuantizeError", "quantize_blocks", "stored_bytes"]

log = logging.getLogger(__name__)

Quantization = Literal["none", "int8", "int4"]
NF4_BLOCK = 64  # weights per absmax scale (bitsandbytes' default block size)


class QuantizeError(UserError, RuntimeError):
    """Quantisation cannot run here (package missing, unsupported architecture)."""


def _bnb():  # noqa: ANN202 - the bitsandbytes module
    try:
        import bitsandbytes
    except ImportError as err:
        raise QuantizeError("model.quantization needs bitsandbytes: pip install "
                            "'hsplitlora[quantization]'") from err
    return bitsandbytes


def quantize_blocks(model: nn.Module, blocks: Iterable[int], kind: Quantization, *,
                    compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every linear layer in ``blocks`` of ``model`` by its quantised version, in
    place (before LoRA is attached); returns how many were replaced.

    int8 keeps one fp32 scale per output row (LLM.int8() without outlier columns, so
    the stored size is exactly known); int4 is NF4 with one fp32 absmax per 64 weights,
    without double quantisation, for the same reason.
    """
    if kind == "none":
        return 0
    spec = arch_spec(model.config)
    if spec.fan_in_fan_out:
        raise QuantizeError(f"model.quantization needs blocks of nn.Linear layers; "
                            f"{model.config.model_type}'s Conv1D layers are not supported: "
                            "set model.quantization: none")
    bnb = _bnb()
    block_list = getattr(getattr(model, spec.backbone), spec.blocks)
    replaced = 0
    for i in blocks:
        block = block_list[i]
        for name, layer in list(block.named_modules()):
            if type(layer) is not nn.Linear:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attr, _quantized(bnb, layer, kind, compute_dtype))
            replaced += 1
    log.info("quantised %d linear layers of %d blocks to %s", replaced, len(list(blocks))
             if not isinstance(blocks, range) else len(blocks), kind)
    return replaced


def _quantized(bnb, layer: nn.Linear, kind: Quantization,  # noqa: ANN001
               compute_dtype: torch.dtype) -> nn.Module:
    device = layer.weight.device
    weight = layer.weight.data.detach().float().cpu()
    bias = layer.bias is not None
    if kind == "int8":
        q = _int8_class(bnb)(layer.in_features, layer.out_features, bias=bias,
                             has_fp16_weights=False, threshold=0.0)
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias,
                              compute_dtype=compute_dtype, quant_type="nf4",
                              compress_statistics=False)
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                     compress_statistics=False, blocksize=NF4_BLOCK)
        # Its CPU inference path repacks the weights in place on the first no-grad call
        # (bf16 scales, another layout; rows narrower than a block fail): off, so a
        # layer computes and stores the same in evaluation as in training.
        q.support_avx512bf16_for_cpu = False
    if bias:
        q.bias = nn.Parameter(layer.bias.data.detach().clone(), requires_grad=False)
    return q.to(device)  # bitsandbytes quantises on the move to a device


_INT8_CLASS: type | None = None


def _int8_class(bnb) -> type:  # noqa: ANN001
    """``Linear8bitLt`` whose first forward leaves the weight's scales on the weight.

    bitsandbytes moves them into the layer's own state and clears them on the weight;
    but every party's copy of a layer shares the one frozen weight (models/shared.py),
    so the second copy to run would find no scales. Here each copy's state only points
    at the weight's (the same storage: no memory is copied).
    """
    global _INT8_CLASS
    if _INT8_CLASS is None:
        class SharedWeightInt8Linear(bnb.nn.Linear8bitLt):
            def init_8bit_state(self) -> None:
                self.state.CB = self.weight.CB
                self.state.SCB = self.weight.SCB

        _INT8_CLASS = SharedWeightInt8Linear
    return _INT8_CLASS


def stored_bytes(module: nn.Module) -> int:
    """Bytes a module's frozen state occupies: parameters, buffers and the scales
    bitsandbytes keeps beside quantised weights, each storage counted once."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in [*module.parameters(), *module.buffers()]:
        add(p)
        add(getattr(p, "SCB", None))
        state = getattr(p, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
    return sum(seen.values())
