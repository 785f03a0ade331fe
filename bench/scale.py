"""Memory and step time of in-process SplitLoRA and HSplitLoRA at 1, 10 and 100 clients.

Each configuration runs in a fresh process (peak RSS is a per-process figure), through
``train()`` as a user runs it: SmolLM2-135M, bf16, batch 2, a few local steps per client
on shards of a few examples, aggregation every 2 steps, batch widths bucketed to
multiples of 16 (``PAD``). HSplitLoRA runs with IWI and ARMSC
off, so every client has the same cut and rank as SplitLoRA (cut 3, rank 8 on q and v) and
only the engine differs: one server-side participant per client, noise-free aggregation
merged into the shared base. Figures:

* peak RSS per configuration and its ratio to the 1-client run of the same mode;
* for HSplitLoRA, the RSS growth from 1 to N clients against what the cost model says
  the extra parties own (their adapters, gradients and AdamW moments, both sides);
* seconds per client step in steady state (the rounds after the first, aggregations
  included), and HSplitLoRA's over SplitLoRA's.

    python bench/scale.py [--clients 1 10 100] [--steps 4] [--model smollm2-135m]

Targets (issue 12): SplitLoRA at 100 clients <= 1.3x its 1-client RSS; HSplitLoRA's growth
<= 1.2x the cost model's per-party bytes; HSplitLoRA s/step <= 1.15x SplitLoRA's, and at
100 clients <= 1.1x its own at 10.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from typing import Any

MODES = ("splitlora", "hsplitlora")
CUT, RANK, BATCH, INTERVAL = 3, 8, 2, 2
# Batch widths bucketed to multiples of 16: the CPU kernels keep state per input shape
# (about 13 MiB a width on SmolLM2), so 100 clients' 400 examples, meeting most widths up to
# 96, would measure the kernels' shape cache, not the clients (docs/engine.md).
PAD = 16


def config(mode: str, clients: int, steps: int, model: str) -> Any:
    from hsplitlora.config import RunConfig

    return RunConfig.model_validate({
        "model": {"name": model},
        "lora": {"r": RANK, "alpha": 32, "dropout": 0.0},
        "data": {"max_train_examples": 4 * clients, "max_length": 96,
                 "pad_to_multiple_of": PAD},
        "train": {"mode": mode, "num_clients": clients, "cut": CUT, "steps": steps,
                  "batch_size": BATCH, "agg_interval": INTERVAL, "precision": "bf16",
                  "lr": 1e-3, "warmup_steps": 1, "seed": 0},
        "hetero": {"importance": False, "adaptive": False, "aggregator": "noisefree"},
        "eval": {"max_examples": 0},
        "output": {"sample_prompt": None},
    })


def party_bytes(result: Any, cfg: Any) -> int:
    """What the cost model says one participant owns beyond the shared base: its
    adapters (rank ``RANK`` on q and v, as planned), their gradients and AdamW moments,
    on the client side, and on the server side too where that is one copy per client (a
    shared server side is one adapter for every client, counted in the 1-client run).
    Not the run's exported adapter: noise-free aggregation stacks every client's ranks."""
    from hsplitlora.hetero.costmodel import (
        ModelDims,
        Workload,
        client_memory,
        server_memory,
    )

    dims = ModelDims.from_config(result.model.config)
    ranks = {k.removesuffix(".lora_A.weight"): RANK
             for k in result.adapter if k.endswith(".lora_A.weight")}
    work = Workload.for_precision("bf16", batch=BATCH, seq=96)
    owned = [client_memory(dims, CUT, ranks, work)]
    if cfg.server_side == "per_participant":
        owned.append(server_memory(dims, CUT, ranks, work))
    return sum(m.lora_weights + m.lora_grads + m.optimizer for m in owned)


def one(mode: str, clients: int, steps: int, model: str) -> dict[str, Any]:
    from hsplitlora.train.run import train

    cfg = config(mode, clients, steps, model)
    result = train(cfg, write=False, show_progress=False)
    steps_ = [r for r in result.records if "event" not in r]
    rounds = sorted({r["round"] for r in steps_})
    first_end = max(r["wall"] for r in result.records if r.get("round") == rounds[0])
    timed = [r for r in steps_ if r["round"] > rounds[0]]
    end = max(r["wall"] for r in result.records)
    return {"mode": mode, "clients": clients,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "s_per_step": (end - first_end) / max(len(timed), 1),
            "party_bytes": party_bytes(result, cfg) if mode == "hsplitlora" else 0,
            "final_loss": result.summary["final_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "CLIENTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.steps, args.model)))
        return
    import torch

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for n in args.clients:  # the modes alternate, so a slow spell falls on both
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--one", mode, str(n), "--steps",
                                  str(args.steps), "--model", args.model],
                                 capture_output=True, text=True, check=True)
            rows[mode, n] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[mode, n]
            print(f"{mode:10s} {n:4d} clients: peak RSS {r['peak_rss'] / 2**30:6.2f} GiB, "
                  f"{r['s_per_step']:.3f} s/client step, final loss {r['final_loss']:.4f}",
                  flush=True)
    lo, hi = min(args.clients), max(args.clients)
    print("\n| mode | clients | peak RSS GiB | x 1 client | s / client step |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        for n in args.clients:
            r = rows[mode, n]
            print(f"| {mode} | {n} | {r['peak_rss'] / 2**30:.2f} | "
                  f"{r['peak_rss'] / rows[mode, lo]['peak_rss']:.2f} | {r['s_per_step']:.3f} |")
    print()
    s = rows["splitlora", hi]["peak_rss"] / rows["splitlora", lo]["peak_rss"]
    print(f"SplitLoRA RSS at {hi} / {lo} clients: {s:.2f}x (target <= 1.3)")
    grow = rows["hsplitlora", hi]["peak_rss"] - rows["hsplitlora", lo]["peak_rss"]
    owned = (hi - lo) * rows["hsplitlora", hi]["party_bytes"]
    print(f"HSplitLoRA RSS growth {lo} -> {hi} clients: {grow / 2**20:.0f} MiB; the extra "
          f"parties' adapters + grads + AdamW per the cost model: {owned / 2**20:.0f} MiB; "
          f"ratio {grow / owned:.2f} (target <= 1.2)")
    for n in args.clients:
        ratio = rows["hsplitlora", n]["s_per_step"] / rows["splitlora", n]["s_per_step"]
        print(f"HSplitLoRA / SplitLoRA s/step at {n} clients: {ratio:.2f} (target <= 1.15)")
    mid = sorted(args.clients)[-2] if len(args.clients) > 1 else lo
    own = rows["hsplitlora", hi]["s_per_step"] / rows["hsplitlora", mid]["s_per_step"]
    print(f"HSplitLoRA s/step at {hi} / {mid} clients: {own:.2f} (target <= 1.1)")


if __name__ == "__main__":
    main()
