"""``train.compile``: torch.compile of the decoder blocks, for training steps only.

**Why.** Between its matmuls a training step runs dozens of small elementwise kernels per
block (RMSNorm and its casts, rotary embeddings, the attention scale/mask/softmax, SiLU
times up-projection, LoRA's scaling and the residual adds), forward and backward, each a
pass over memory. Eager PyTorch launches them one by one; inductor fuses them into a few
loops per block. Measured on SmolLM2-135M, bf16, batch 4 x 128, 2 cores of a Xeon with
AMX (bench/step_overhead.py): 0.50 -> 0.34 s per step, centralized and SplitLoRA alike.
On a CPU without AMX, where the matmuls themselves dominate, the gain is smaller.

**How.** Regional compilation: one compiled function runs any block (``_block_forward``
takes the block as an argument and PyTorch treats its parameters as inputs), so the
thirty identical blocks of a model, and every client's copy of them, share one compiled
graph instead of compiling thirty. A different block structure (another architecture, a
block without LoRA, another dtype) compiles once more, and since that one function serves
them all, its limit of variants is raised from dynamo's default 8 to 64 (past it, blocks
fall back to eager: slower, never wrong). The first steps pay the compile (about 25 s
here, a few seconds when inductor's on-disk cache already holds it); a change of batch
shape compiles one shape-generic graph and then no more.

**Where.** Only inside a role's training forward (:func:`compiled_blocks`): evaluation,
generation with a KV cache and the importance probes run eager, so they neither compile
graphs nobody trains with nor depend on a compiler. The backward pass runs inductor's
compiled backward through autograd as usual.

**Numbers.** Inductor may keep a fused chain of bf16 ops in fp32 where eager rounds each
op's result, so bf16 losses differ from eager in the last bits; in fp32 they match to
round-off. LoRA dropout draws its masks from inductor's generator, seeded from torch's
default generator: a run is reproducible, but its masks are not eager's.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Callable, Iterator

import torch
from torch import nn

from hsplitlora.errors import UserError

__all__ = ["CompileError", "check_compiler", "compiled_blocks"]


class CompileError(UserError, RuntimeError):
    """torch.compile cannot run here."""


def _block_forward(block: nn.Module, *args: object, **kwargs: object) -> object:
    return type(block).forward(block, *args, **kwargs)


@functools.cache
def _compiled_block_forward() -> Callable[..., object]:
    """The one compiled block function, made on first use: creating it loads inductor,
    which costs every process that never compiles most of a second."""
    return torch.compile(_block_forward)


_VARIANTS = 64  # compiled variants of the one block function (see the module docstring)


@contextlib.contextmanager
def compiled_blocks(blocks: nn.ModuleList, enabled: bool = True) -> Iterator[None]:
    """Within the ``with``, each of ``blocks`` runs its forward through the one compiled
    block function; on exit the blocks are plain modules again.

    Module hooks still run eagerly around the compiled forward (the server segment's
    hook that feeds the received activations into its first block relies on that).
    """
    if not enabled:
        yield
        return
    compiled = _compiled_block_forward()
    for block in blocks:
        block.forward = functools.partial(compiled, block)
    try:
        with torch._dynamo.config.patch(recompile_limit=_VARIANTS):
            yield
    finally:
        for block in blocks:
            del block.forward


def check_compiler(device: torch.device) -> None:
    """Fail before the model loads if ``train.compile`` cannot work on ``device``.

    Inductor turns CPU graphs into C++ and builds them with the system's C++ compiler;
    on CUDA it writes Triton kernels, and Triton builds its small kernel launcher with
    the system's C compiler ($CC, else gcc or clang, as Triton looks for it). Without
    one, the first training step would fail deep inside torch.
    """
    if device.type == "cuda":
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            raise CompileError(
                "train.compile on CUDA needs a C compiler (Triton builds its kernel "
                "launcher with it), and none was found ($CC, gcc or clang): install one, "
                "e.g. `apt install gcc`, or set train.compile: false")
        return
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch that moved it: let inductor report for itself
        return
    try:
        get_cpp_compiler()
    except Exception as exc:  # inductor raises its own InvalidCxxCompiler
        raise CompileError(
            "train.compile needs a C++ compiler on the CPU (torch's inductor builds the "
            "fused kernels with it), and none was found (g++, or $CXX): install one, e.g. "
            "`apt install g++`, or set train.compile: false"
        ) from exc
