"""Centralized LoRA vs SplitLoRA (4 clients) in one process: same model, batches, steps.

Prints seconds per step for each mode and their ratio (target <= 1.05: both do the same
arithmetic, the split only adds a detach and a hand-over), bytes per step of activations
and gradients, and model-FLOPs utilisation: FLOPs of one training step (counted by
torch's FlopCounterMode, so only what the step computes: the LM head runs on target
positions only) / step time, against a bf16 matmul peak measured in this run.

The two modes are timed in alternating rounds (one step per client of each, in turn), so
a slow spell of a shared machine falls on both alike. Step times are means over the timed
steps (throughput, what MFU uses), medians alongside; the ratio is given for both. The
matmul peak is the best of trials before and after the steps.

To show where the rest of the step goes, the matmuls of one centralized step are also
replayed alone (same ops, shapes, layouts and dtypes, on stand-in tensors): their time is
what the step would take if everything between the matmuls were free, and so bounds the
MFU this model reaches at this batch size on this machine.

    python bench/step_overhead.py [--model smollm2-135m] [--steps 24] [--batch 4] [--seq 128]
                                  [--compile] [--system-malloc]

``--compile`` runs the decoder blocks compiled (``train.compile``); the compile itself
happens in the warm-up steps, outside the timing.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from hsplitlora.models.load import load_model, use_attention
from hsplitlora.models.lora import LoraSettings, attach_lora
from hsplitlora.models.split import split_model
from hsplitlora.roles.client import Client
from hsplitlora.roles.learner import Learner
from hsplitlora.roles.server import MainServer
from hsplitlora.runtime.optim import OptimSettings
from hsplitlora.runtime.process import keep_freed_memory


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 2048, reps: int = 10,
                trials: int = 8) -> float:
    """Best sustained FLOP/s of an n x n x n matmul over a few trials, after warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


_aten = torch.ops.aten
_MATMULS = {_aten.mm.default, _aten.bmm.default, _aten.addmm.default, _aten.baddbmm.default}


@dataclass(frozen=True)
class _Layout:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def stand_in(self) -> torch.Tensor:
        """A random tensor with this layout (transposed and broadcast views included)."""
        size = 1 + sum((n - 1) * st for n, st in zip(self.shape, self.stride, strict=True))
        return torch.randn(size, dtype=self.dtype).as_strided(self.shape, self.stride)


class MatmulLog(TorchDispatchMode):
    """Records every matmul a step runs: the op and its arguments' layouts."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in _MATMULS:
            self.calls.append((func, tuple(
                _Layout(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor)
                else a for a in args)))
        return func(*args, **(kwargs or {}))


def matmul_seconds(calls: list[tuple[Any, tuple[Any, ...]]], trials: int = 5) -> float:
    """Best time to run the recorded matmuls back to back on stand-in tensors (one per
    distinct layout, so they run from warm caches: a floor, not an estimate)."""
    tensors: dict[_Layout, torch.Tensor] = {}
    replay = [(func, [tensors.setdefault(a, a.stand_in()) if isinstance(a, _Layout) else a
                      for a in args]) for func, args in calls]
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for func, args in replay:
            func(*args)
        best = min(best, time.perf_counter() - t)
    return best


def cpu_name() -> str:
    """The CPU's model name, and whether it has AMX (bf16 matrix tiles), on which the
    figures depend most: AMX multiplies bf16 matrices several times faster than AVX-512."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())
    return f"{name}, {'with' if 'amx_bf16' in info else 'without'} AMX"


def step_times(step: Callable[[], object], n: int) -> list[float]:
    """Wall time of each of ``n`` calls."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def batches(vocab: int, count: int, batch: int, seq: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 2] = -100  # loss on the second half, like a prompt/target split
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--cut", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24, help="timed mini-batches per mode")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--base-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attention", default="auto", choices=["auto", "eager", "sdpa"],
                    help="as model.attention in a run config (auto: eager on CPU)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the blocks' training forward (train.compile: true)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's default (train.keep_memory: false) for comparison")
    args = ap.parse_args()
    kept = not args.system_malloc and keep_freed_memory()
    model, _ = load_model(args.model, dtype=getattr(torch, args.base_dtype))
    attention = use_attention(model, args.attention, torch.device("cpu"))
    torch.manual_seed(0)
    attach_lora(model, LoraSettings(r=8, alpha=32))
    data = batches(model.config.vocab_size, args.steps + 2, args.batch, args.seq)
    assert args.steps % args.clients == 0, "--steps must be a multiple of --clients"
    optim = OptimSettings(lr=1e-4, total_steps=args.steps + 2)

    # Centralized: one party, whole model. FLOPs are counted on an eager step: compiled or
    # not, the step does the same arithmetic.
    learner = Learner(copy.deepcopy(model), iter(data), optim, precision="bf16")
    with FlopCounterMode(display=False) as counter, MatmulLog() as matmuls:
        learner.step()
    flops = counter.get_total_flops()
    learner.compile = args.compile
    learner.step()  # warm-up (and compile)
    learner.batches = iter(data[2:])

    # SplitLoRA: the same timed batches, dealt round-robin over the clients; each client
    # first warms up on the warm-up batch.
    client_seg, server_seg = split_model(model, args.cut)
    timed = data[2:]
    clients = [Client(i, copy.deepcopy(client_seg), iter([data[0], *timed[i :: args.clients]]),
                      1, optim, precision="bf16", compile=args.compile)
               for i in range(args.clients)]
    server = MainServer(server_seg, range(args.clients), optim, precision="bf16",
                        compile=args.compile)
    up = down = 0

    def one(client: Client) -> None:
        nonlocal up, down
        acts = client.forward()
        reply = server.step(client.client_id, acts)
        client.backward(reply.grad)
        up, down = acts.nbytes, reply.nbytes

    for c in clients:
        one(c)
    turn = itertools.cycle(clients)
    peak_before = matmul_peak()
    central_t: list[float] = []
    split_t: list[float] = []
    for _ in range(args.steps // args.clients):
        central_t += step_times(learner.step, args.clients)
        split_t += step_times(lambda: one(next(turn)), args.clients)
    central, central_median = statistics.fmean(central_t), statistics.median(central_t)
    split, split_median = statistics.fmean(split_t), statistics.median(split_t)
    peak = max(peak_before, matmul_peak())
    floor = matmul_seconds(matmuls.calls)
    tokens = args.batch * args.seq
    print(f"cpu {cpu_name()}  torch {torch.__version__}")
    print(f"model {args.model}  base {args.base_dtype}  attention {attention}  batch "
          f"{args.batch} x seq {args.seq} ({tokens} tokens, loss on the second half)  "
          f"blocks {'compiled' if args.compile else 'eager'}  "
          f"threads {torch.get_num_threads()}  freed memory "
          f"{'kept for reuse' if kept else 'system default'}")
    print(f"centralized LoRA : {central:.3f} s/step (median {central_median:.3f})")
    print(f"SplitLoRA ({args.clients} clients, cut {args.cut}): {split:.3f} s/step (median "
          f"{split_median:.3f})")
    print(f"ratio split/centralized: {split / central:.3f} (medians "
          f"{split_median / central_median:.3f})  (target <= 1.05)")
    print(f"bytes per step: activations up {up:,} B, gradients down {down:,} B")
    print(f"FLOPs per step (FlopCounterMode): {flops / 1e9:.1f} GFLOP")
    print(f"bf16 matmul peak: {peak / 1e9:.0f} GFLOP/s")
    for name, s in (("centralized", central), ("split", split)):
        print(f"MFU {name}: {flops / s / 1e9:.0f} GFLOP/s = {flops / s / peak:.0%} of peak "
              "(goal >= 60 %)")
    print(f"the step's {len(matmuls.calls)} matmuls alone, replayed: {floor:.3f} s "
          f"({floor / central:.0%} of the centralized step; the rest is the work between "
          f"them, the optimizer and dispatch): MFU at most {flops / floor / peak:.0%} at "
          "this batch on this machine")


if __name__ == "__main__":
    main()
