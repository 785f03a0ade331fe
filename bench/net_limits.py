"""Networked SplitLoRA over bandwidth-limited links vs the simulated clock's prediction.

Each party runs in its own network namespace: the main server in one, every client in
another, joined to the server's by a veth pair whose two ends are shaped with a token
bucket (``tc tbf``) at the given rate, one way for the upload and the other for the
download. For each rate the script runs a real deployment (``net_overhead.py`` roles:
``serve`` and ``join`` processes) and compares the measured median round time with what
:func:`hsplitlora.train.clock.simulate` predicts from the run's own metrics.

The clock's compute speed is calibrated once, on the unshaped run (all parties share this
machine's cores, so no device profile describes them); the shaped runs then test the
clock's network model: transfers of the recorded bytes at the link rate. ``netem``
latency is not used: this kernel has no ``sch_netem`` (the clock does not model latency
either). Needs root and iproute2.

    sudo python bench/net_limits.py [--rates 0,100,20] [--clients 1] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from net_overhead import add_run_arguments, networked, round_seconds, run_config  # noqa: E402

from hsplitlora.config import RunConfig  # noqa: E402
from hsplitlora.transport.config import NetConfig  # noqa: E402

SERVER_NS = "hsnl_srv"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def client_ns(i: int) -> str:
    return f"hsnl_c{i}"


def build_topology(clients: int, mbit: float) -> None:
    """A server namespace and one namespace per client, each linked to the server by a
    veth pair shaped at ``mbit`` both ways (0: unshaped)."""
    teardown(clients)
    sh("ip", "netns", "add", SERVER_NS)
    sh("ip", "-n", SERVER_NS, "link", "set", "lo", "up")
    for i in range(clients):
        ns, s_end, c_end = client_ns(i), f"hsnl_s{i}", f"hsnl_v{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", s_end, "type", "veth", "peer", "name", c_end)
        sh("ip", "link", "set", s_end, "netns", SERVER_NS)
        sh("ip", "link", "set", c_end, "netns", ns)
        sh("ip", "-n", SERVER_NS, "addr", "add", f"10.78.{i}.1/24", "dev", s_end)
        sh("ip", "-n", ns, "addr", "add", f"10.78.{i}.2/24", "dev", c_end)
        for where, dev in ((SERVER_NS, s_end), (ns, c_end)):
            sh("ip", "-n", where, "link", "set", dev, "up")
            if mbit:
                # A bucket of 20 ms at the rate: a smaller one starves a fast link
                # between timer ticks (tbf refills per tick, not continuously).
                burst = max(64_000, int(mbit * 1e6 / 8 * 0.02))
                sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root",
                   "tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", "1s")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def teardown(clients: int) -> None:
    for ns in [SERVER_NS, *(client_ns(i) for i in range(clients))]:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def deploy(cfg: RunConfig, net: NetConfig, work: Path, timeout: float) -> list[dict[str, Any]]:
    """One deployment across the namespaces; returns the server's metrics records."""
    run = networked(
        cfg, net, work, timeout,
        prefix=lambda c: ("ip", "netns", "exec", SERVER_NS if c is None else client_ns(c)),
        host=lambda c: f"10.78.{c}.1")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def predicted_rounds(cfg: RunConfig, model: Any, records: list[dict[str, Any]], flops: float,
                     mbit: float) -> list[float]:
    """The simulated clock's round durations for this run on links of ``mbit`` (0: no
    limit) and devices of ``flops`` FLOP/s."""
    from hsplitlora.hetero.costmodel import ModelDims
    from hsplitlora.hetero.profiles import DeviceProfile
    from hsplitlora.models.lora import target_module_names
    from hsplitlora.models.split import arch_spec
    from hsplitlora.train.clock import simulate

    rate = mbit * 1e6 / 8 if mbit else 1e15
    device = DeviceProfile(name="ns", memory_bytes=2**40, flops=flops, uplink_bps=rate,
                           downlink_bps=rate)
    server = DeviceProfile(name="srv", memory_bytes=2**40, flops=flops, uplink_bps=1e15,
                           downlink_bps=1e15)
    t = cfg.train
    targets = tuple(cfg.lora.targets or arch_spec(model.config).default_targets)
    ranks = {m: cfg.lora.r for m in target_module_names(model, targets)}
    clock = simulate(records, mode=cfg.mode, dims=ModelDims.from_config(model.config),
                     cuts={c: t.cut for c in range(t.num_clients)},
                     ranks={c: ranks for c in range(t.num_clients)},
                     clients=[device] * t.num_clients, server=server, batch=t.batch_size,
                     seq=cfg.data.max_length, precision=t.precision)
    return [b - a for a, b in zip(clock, clock[1:], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(ap, steps=6, eval_examples=0)
    ap.add_argument("--rates", default="0,100,20", help="Mbit/s per link and direction; "
                    "0 = unshaped (the calibration run, first)")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("tc"):
        sys.exit("net_limits.py needs root and iproute2 (ip, tc) to build network namespaces")
    from hsplitlora.models.load import load_model

    rates = [float(r) for r in args.rates.split(",")]
    model, _ = load_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="net-limits-"))
    rows = []
    flops = 0.0
    try:
        for mbit in rates:
            build_topology(args.clients, mbit)
            cfg = run_config(args, work / f"r{mbit:g}")
            net = NetConfig(host="0.0.0.0", port=0, step_timeout_s=600, join_timeout_s=600)
            records = deploy(cfg, net, work / f"r{mbit:g}", args.timeout)
            measured = statistics.median(round_seconds(records))
            if not flops:  # calibrate: the clock's compute time equals the unshaped run's
                at_one = predicted_rounds(cfg, model, records, 1.0, mbit)
                flops = statistics.median(at_one) / measured
            predicted = statistics.median(predicted_rounds(cfg, model, records, flops, mbit))
            steps = [r for r in records if "event" not in r]
            per_step = sum(r["bytes_up"] + r["bytes_down"] for r in steps) / len(steps)
            rows.append((mbit, measured, predicted, per_step))
    finally:
        teardown(args.clients)
    print(f"\nSplitLoRA on {args.model} over gRPC, {args.clients} client(s) in their own "
          f"network namespaces, cut {args.cut}, batch {args.batch} x {args.max_length}, "
          f"fp32 wire, {args.steps} rounds")
    print(f"clock calibrated on the unshaped run: {flops / 1e9:.0f} GFLOP/s per party")
    print(f"{'link':>10}{'bytes/step':>12}{'measured s/round':>18}{'clock s/round':>15}"
          f"{'measured/clock':>16}")
    for mbit, measured, predicted, per_step in rows:
        link = f"{mbit:g} Mbit/s" if mbit else "unshaped"
        print(f"{link:>10}{per_step:>12.0f}{measured:>18.3f}{predicted:>15.3f}"
              f"{measured / predicted:>16.3f}")


if __name__ == "__main__":
    main()
