"""bf16 vs int8 vs int4 (NF4) frozen client weights on SmolLM2-135M: the demo's training
(configs/demo.yaml, SplitLoRA, 4 clients, cut 3) in each, then held-out perplexity; and
per setting the client segment's frozen weights and its peak memory in a step (frozen
weights + what autograd keeps + the activations sent + LoRA state), measured as tensor
storages, beside the cost model's figures.

    python bench/quantization.py [--steps 40] [--cut 3]

Prints a markdown table (docs/quantization.md holds one); each setting runs in its own
process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def client_peak(kind: str, cut: int) -> dict[str, float]:
    """One client's step on its own segment: the bytes it holds at the end of the forward
    (its peak), measured as storages, beside the cost model's prediction."""
    import torch

    from hsplitlora.config import load_config
    from hsplitlora.hetero.costmodel import ModelDims, Workload, client_memory
    from hsplitlora.hetero.measure import saved_bytes
    from hsplitlora.models.load import load_model
    from hsplitlora.models.lora import LoraSettings, attach_lora
    from hsplitlora.models.quantize import quantize_blocks, stored_bytes
    from hsplitlora.models.split import split_model

    torch.set_num_threads(2)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"train.cut={cut}"])
    model, _ = load_model(cfg.model.name, dtype=torch.bfloat16)
    # SDPA, what the cost model costs (a device's fused kernel); CPU training picks eager
    # attention for speed, which also keeps the [b, heads, s, s] probabilities
    model.set_attn_implementation("sdpa")
    quantize_blocks(model, range(cut), kind)
    dims = ModelDims.from_config(model.config)
    client, _ = split_model(model, cut)
    del model
    attach_lora(client, LoraSettings(r=8, alpha=32, dropout=0.0))
    lora = [p for n, p in client.named_parameters() if ".lora_" in n]
    frozen = stored_bytes(client) - sum(p.numel() * 4 for p in lora)
    work = Workload.for_precision("bf16", batch=4, seq=128, quantization=kind)
    ranks = {n.rsplit(".lora_", 1)[0].replace("backbone.", "model.", 1): 8
             for n, _ in client.named_parameters() if ".lora_A" in n}
    predicted = client_memory(dims, cut, ranks, work)
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1:, 100:] = 0  # a padded batch, as training's are (Workload.padded)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept, h = saved_bytes(lambda: client(ids, mask), list(client.parameters()))
    h.float().sum().backward()
    # LoRA weights, their gradients and AdamW's two moments, all fp32.
    state = sum(p.numel() * 4 for p in lora) * 4
    return {"frozen_measured": frozen, "frozen_predicted": predicted.frozen_weights,
            "peak_measured": frozen + kept + h.numel() * h.element_size() + state,
            "peak_predicted": predicted.total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cut", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="runs/bench-quantization")
    args = ap.parse_args()
    if args.client:
        print(json.dumps(client_peak(args.client, args.cut)))
        return
    if args.one:
        from hsplitlora.config import load_config
        from hsplitlora.train.run import train

        kind = args.one
        cfg = load_config(REPO / "configs" / "demo.yaml", [
            f"train.steps={args.steps}", f"train.cut={args.cut}",
            f"model.quantization={'none' if kind == 'bf16' else kind}",
            f"output.dir={args.out}", f"output.name={kind}", "output.sample_prompt=null"])
        s = train(cfg, show_progress=False).summary
        print(json.dumps({"eval_ppl": s["eval_ppl"], "final_loss": s["final_loss"],
                          "seconds_per_step": s["seconds_per_step"]}))
        return
    rows = []
    for kind in ("bf16", "int8", "int4"):
        def run(*extra: str) -> dict[str, float]:
            done = subprocess.run([sys.executable, __file__, "--cut", str(args.cut),
                                   "--steps", str(args.steps), "--out", args.out, *extra],
                                  capture_output=True, text=True, check=True)
            return json.loads(done.stdout.strip().splitlines()[-1])

        quant = "none" if kind == "bf16" else kind
        rows.append({"kind": kind, **run("--client", quant), **run("--one", kind)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    mib = 2**20
    print(f"SmolLM2-135M, SplitLoRA, 4 clients, cut {args.cut}, {args.steps} local steps "
          "(configs/demo.yaml)\n")
    print("| client base | frozen weights: measured / cost model | client peak: measured / "
          "cost model | held-out ppl | final loss | s/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['frozen_measured'] / mib:.2f} / "
              f"{r['frozen_predicted'] / mib:.2f} MiB | {r['peak_measured'] / mib:.2f} / "
              f"{r['peak_predicted'] / mib:.2f} MiB | {r['eval_ppl']:.3f} | "
              f"{r['final_loss']:.4f} | {r['seconds_per_step']:.2f} |")


if __name__ == "__main__":
    main()
