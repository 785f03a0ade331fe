"""SplitLoRA over gRPC on loopback vs in one process: same model, data, seed and steps.

Prints seconds per client step in process and networked (target ratio <= 1.15), bytes per
step on the wire for the fp32 (exact), bf16 and int8 wire formats (targets <= 0.5x and
<= 0.27x of fp32), and the quality cost of each: held-out loss of the final adapter.
Each networked run is a real deployment: a main-server process and one process per
client, started by this script (it re-invokes itself with --role). The in-process run is
timed before and after the networked ones, and every figure is a median over rounds, since
a shared machine's load comes in bursts.
OpenMP threads sleep instead of spinning when idle (OMP_WAIT_POLICY=PASSIVE): with two
processes taking turns on the same cores, spinning would bill one's idle time to the other.

    python bench/net_overhead.py [--clients 1] [--steps 8] [--batch 4] [--cut 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Set before torch loads OpenMP (it reads this once): idle threads sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hsplitlora.config import RunConfig  # noqa: E402
from hsplitlora.transport.config import NetConfig  # noqa: E402


def add_run_arguments(ap: argparse.ArgumentParser, *, steps: int, eval_examples: int) -> None:
    """The flags :func:`run_config` reads (net_limits.py builds its runs the same way)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--cut", type=int, default=3)
    ap.add_argument("--steps", type=int, default=steps, help="rounds (steps per client)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--eval-examples", type=int, default=eval_examples)


def run_config(args: argparse.Namespace, out: Path) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"name": args.model},
        "lora": {"r": 8, "alpha": 32, "dropout": 0.0},
        "data": {"max_train_examples": 400 * args.clients, "max_length": args.max_length},
        "train": {"mode": "splitlora", "num_clients": args.clients, "cut": args.cut,
                  "steps": args.steps, "batch_size": args.batch, "agg_interval": 4,
                  "lr": 2e-4, "precision": "fp32", "seed": 0, "threads": args.threads},
        "eval": {"max_examples": args.eval_examples},
        "output": {"dir": str(out), "name": "net", "sample_prompt": None},
    })


# -- the processes of one networked run (this script, re-invoked) ---------------------------
def role_main(args: argparse.Namespace) -> None:
    import logging

    from hsplitlora.transport.deploy import join, serve

    logging.basicConfig(level=logging.WARNING, format=f"[{args.role}] %(message)s")
    cfg = RunConfig.model_validate_json(Path(args.cfg).read_text())
    net = NetConfig.model_validate_json(Path(args.net).read_text())
    if args.role == "server":
        serve(cfg, net, port_file=Path(args.port_file))
    else:
        join(cfg, net, args.client_id, args.address)


def spawn(role: str, cfg_file: Path, net_file: Path, *extra: str,
          prefix: Sequence[str] = ()) -> subprocess.Popen:
    """One party: this script re-invoked with ``--role``, behind ``prefix`` (e.g.
    ``ip netns exec NS``, as net_limits.py runs it)."""
    cmd = [*prefix, sys.executable, __file__, "--role", role, "--cfg", str(cfg_file), "--net",
           str(net_file), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def networked(cfg: RunConfig, net: NetConfig, work: Path, timeout: float, *,
              prefix: Callable[[int | None], Sequence[str]] = lambda client: (),
              host: Callable[[int], str] = lambda client: "127.0.0.1") -> Path:
    """Run one deployment; returns the server's run folder. By default every party is on
    loopback; ``prefix(client id, None for the server)`` and ``host(client id)`` (the
    server's address as that client sees it) place them elsewhere."""
    work.mkdir(parents=True, exist_ok=True)
    cfg_file, net_file, port_file = work / "cfg.json", work / "net.json", work / "port"
    cfg_file.write_text(cfg.model_dump_json())
    net_file.write_text(net.model_dump_json())
    procs = [spawn("server", cfg_file, net_file, "--port-file", str(port_file),
                   prefix=prefix(None))]
    end = time.monotonic() + timeout
    while not port_file.exists():
        if time.monotonic() > end or procs[0].poll() is not None:
            raise RuntimeError("the main server did not start")
        time.sleep(0.1)
    port = port_file.read_text()
    procs += [spawn("client", cfg_file, net_file, "--client-id", str(i), "--address",
                    f"{host(i)}:{port}", prefix=prefix(i))
              for i in range(cfg.train.num_clients)]
    try:
        codes = [p.wait(max(1.0, end - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            p.kill()
    if any(codes):
        raise RuntimeError(f"a party failed: exit codes {codes}")
    return Path(cfg.output.dir) / "net"


# -- measurements -------------------------------------------------------------------------
def round_seconds(records: list[dict[str, Any]]) -> list[float]:
    """Duration of every round after the first (which pays the warm-up)."""
    ends: dict[int, float] = {}
    for r in records:
        if "event" not in r:
            ends[r["round"]] = r["wall"]
    walls = [ends[k] for k in sorted(ends)]
    return [b - a for a, b in zip(walls, walls[1:], strict=False)]


def step_seconds(rounds: list[float], clients: int) -> float:
    """Seconds per client step: the median round, robust to a busy neighbour's bursts."""
    return statistics.median(rounds) / clients


def bytes_per_step(records: list[dict[str, Any]]) -> tuple[float, float]:
    steps = [r for r in records if "event" not in r]
    return (sum(r["bytes_up"] for r in steps) / len(steps),
            sum(r["bytes_down"] for r in steps) / len(steps))


def held_out_loss(p: Any, adapter: dict[str, torch.Tensor]) -> float:
    from hsplitlora.data.tokenize import pad_id_for
    from hsplitlora.eval.perplexity import perplexity
    from hsplitlora.models.lora import load_lora_state

    load_lora_state(p.model, adapter)
    loss, _ = perplexity(p.model, p.eval_features, pad_id=pad_id_for(p.tokenizer),
                         batch_size=8, precision="fp32", device=p.device)
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    ap.add_argument("--net", help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    ap.add_argument("--client-id", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    add_run_arguments(ap, steps=8, eval_examples=64)
    ap.add_argument("--codecs", default="none,bf16,int8")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    if args.role:
        role_main(args)
        return

    from safetensors.torch import load_file

    from hsplitlora.models.lora import load_lora_state, lora_state
    from hsplitlora.train.recorder import Recorder
    from hsplitlora.train.run import prepare, run_mode

    work = Path(tempfile.mkdtemp(prefix="net-overhead-"))
    cfg = run_config(args, work / "inproc")
    p = prepare(cfg)
    initial = lora_state(p.model)

    def in_process() -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        load_lora_state(p.model, initial)
        with Recorder(None, cfg.train.steps, show_progress=False) as rec:
            return rec.records, run_mode(p, rec)

    records, adapter = in_process()
    local_rounds = round_seconds(records)
    rows = [("in-process", 0.0, 1.0, *bytes_per_step(records), held_out_loss(p, adapter))]
    for codec in args.codecs.split(","):
        codec_cfg = run_config(args, work / codec)
        net = NetConfig(port=0, codec=codec, step_timeout_s=600, join_timeout_s=600)
        run = networked(codec_cfg, net, work / codec, args.timeout)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        net_records = [json.loads(line) for line in lines]
        seconds = step_seconds(round_seconds(net_records), args.clients)
        final = {k.removeprefix("base_model.model."): v for k, v in
                 load_file(run / "adapter" / "adapter_model.safetensors").items()}
        rows.append((f"gRPC {codec}", seconds, 0.0, *bytes_per_step(net_records),
                     held_out_loss(p, final)))
    local_rounds += round_seconds(in_process()[0])
    base = step_seconds(local_rounds, args.clients)
    rows = [(name, sec or base, (sec or base) / base, *rest) for name, sec, _, *rest in rows]
    fp32_bytes = next((r[3] + r[4] for r in rows if r[0] == "gRPC none"), None)
    print(f"\nSplitLoRA on {args.model}: {args.clients} client(s), cut {args.cut}, batch "
          f"{args.batch}, {args.steps} rounds, fp32, {args.threads} threads per process")
    print(f"{'run':<14}{'s/step':>9}{'vs in-proc':>12}{'bytes up':>12}{'bytes down':>12}"
          f"{'vs fp32 wire':>14}{'held-out loss':>15}")
    for name, sec, ratio, up, down, loss in rows:
        rel = f"{(up + down) / fp32_bytes:.3f}" if fp32_bytes and name.startswith("gRPC") else ""
        print(f"{name:<14}{sec:>9.3f}{ratio:>12.3f}{up:>12.0f}{down:>12.0f}{rel:>14}{loss:>15.4f}")
    print("(in-process bytes count int64 masks and labels, as the simulation does; the wire "
          "sends them as uint8 and int32)")


if __name__ == "__main__":
    main()
