"""The cost model's predictions against measurement on a real model, at a few cuts.

For each cut and precision it prints predicted vs measured:

* forward and backward FLOPs of the client and server segments (torch's FlopCounterMode,
  eager attention, because the counter cannot see inside CPU SDPA);
* activation bytes kept for backward (saved-tensor hooks, unique storages, default SDPA);
* bytes sent up (``Activations.nbytes``) and down (``ServerReply.nbytes``);
* frozen weight bytes (the segments' base parameters) and LoRA state (adapters + AdamW).

    python bench/costmodel_check.py [--model smollm2-135m] [--cuts 1 3 10 20] [--batch 4]
                                    [--seq 64] [--rank 8] [--dropout 0.1]
                                    [--precisions bf16 fp32]
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from hsplitlora.hetero.costmodel import (
    ModelDims,
    Workload,
    bytes_down,
    bytes_up,
    client_flops,
    client_memory,
    server_flops,
    server_memory,
)
from hsplitlora.hetero.measure import counted_flops, saved_bytes
from hsplitlora.models.load import load_model
from hsplitlora.models.lora import LoraSettings, attach_lora, lora_parameters, target_module_names
from hsplitlora.models.split import arch_spec, split_model
from hsplitlora.roles.messages import Activations, ServerReply
from hsplitlora.runtime.optim import causal_lm_loss


def batch(vocab: int, size: int, seq: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (size, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq * 3 // 4:] = 0  # padding, as training batches have
    return ids, mask


def measure(args, model, precision: str, cut: int, attn: str) -> dict[str, tuple[int, int]]:
    """(predicted, measured) per quantity for one cut: FLOPs with eager attention, the
    rest with SDPA."""
    bf16 = precision == "bf16"
    model.set_attn_implementation(attn)
    plan = dict.fromkeys(target_module_names(model, arch_spec(model.config).targets), args.rank)
    dims = ModelDims.from_config(model.config)
    work = Workload.for_precision(precision, args.batch, args.seq, lora_dropout=args.dropout)
    client, server = split_model(model, cut)
    client.train()
    server.train()
    ids, mask = batch(dims.vocab, args.batch, args.seq)
    rows: dict[str, tuple[int, int]] = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if attn == "eager":
            c_fwd, hidden = counted_flops(lambda: client(ids, mask))
            received = hidden.detach().requires_grad_(True)
            s_fwd, loss = counted_flops(lambda: causal_lm_loss(server(received, mask), ids)[0])
        else:
            c_kept, hidden = saved_bytes(lambda: client(ids, mask), list(client.parameters()))
            received = hidden.detach().requires_grad_(True)
            s_kept, loss = saved_bytes(lambda: causal_lm_loss(server(received, mask), ids)[0],
                                       list(server.parameters()))
    s_bwd, _ = counted_flops(loss.backward)
    c_bwd, _ = counted_flops(lambda: hidden.backward(received.grad))
    c_mem, s_mem = client_memory(dims, cut, plan, work), server_memory(dims, cut, plan, work)
    if attn == "eager":
        c_flops, s_flops = client_flops(dims, cut, plan, work), server_flops(dims, cut, plan, work)
        rows["client forward FLOPs"] = (c_flops.forward, c_fwd)
        rows["client backward FLOPs"] = (c_flops.backward, c_bwd)
        rows["server forward FLOPs"] = (s_flops.forward, s_fwd)
        rows["server backward FLOPs"] = (s_flops.backward, s_bwd)
        return rows
    upload = Activations(hidden.detach(), mask, ids)
    reply = ServerReply(loss=loss.item(), tokens=0, grad=received.grad)
    rows["client activations"] = (c_mem.activations, c_kept)
    rows["server activations"] = (s_mem.activations, s_kept)
    rows["bytes up"] = (bytes_up(args.batch, args.seq, dims.hidden, work.act_bytes),
                        upload.nbytes)
    rows["bytes down"] = (bytes_down(args.batch, args.seq, dims.hidden, work.act_bytes),
                          reply.nbytes)

    def base_bytes(segment):
        return sum(p.numel() * p.element_size() for n, p in segment.named_parameters()
                   if ".lora_" not in n)

    def lora_bytes(segment):
        return sum(p.numel() * p.element_size() for p in lora_parameters(segment))

    rows["client frozen weights"] = (c_mem.frozen_weights, base_bytes(client))
    rows["server frozen weights"] = (s_mem.frozen_weights, base_bytes(server))
    rows["client LoRA weights"] = (c_mem.lora_weights, lora_bytes(client))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cuts", type=int, nargs="+", default=[1, 3, 10, 20])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank on every targetable matrix")
    ap.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout")
    ap.add_argument("--precisions", nargs="+", default=["bf16"], choices=["bf16", "fp32"])
    args = ap.parse_args()
    console = Console()
    for precision in args.precisions:
        table = Table(title=f"{args.model}, {precision}, batch {args.batch} x seq {args.seq}, "
                      f"LoRA r={args.rank} on all targets, dropout {args.dropout}")
        for column in ("cut", "quantity", "predicted", "measured", "error"):
            table.add_column(column, justify="left" if column == "quantity" else "right")
        model, _ = load_model(args.model, dtype=torch.bfloat16 if precision == "bf16"
                              else torch.float32)
        targets = arch_spec(model.config).targets
        attach_lora(model, LoraSettings(r=args.rank, targets=targets, dropout=args.dropout))
        for cut in args.cuts:
            rows = {**measure(args, model, precision, cut, "eager"),
                    **measure(args, model, precision, cut, "sdpa")}
            for name, (predicted, measured) in rows.items():
                error = predicted / measured - 1 if measured else float("nan")
                table.add_row(str(cut), name, f"{predicted:,}", f"{measured:,}", f"{error:+.2%}")
            table.add_section()
        console.print(table)


if __name__ == "__main__":
    main()
