"""SplitLoRA with its roles in Ray actors vs in one process: same model, data, seed, steps.

Prints, for each backend, the time to get the actors running (Ray only), the median
seconds per round (one round = one step of every client) and the final training loss:
the backends compute the same thing, only the placement differs (losses agree to bf16
rounding: an actor runs as many torch threads as CPUs it reserves, and the thread count
can change a bf16 matmul's last bits).
On one small machine the actors share its cores, so the figures show the overhead of
the actor hand-offs; on a cluster the clients' forward and backward passes run on their
own nodes while the main server works, which is what the backend is for.

    python bench/ray_scale.py [--model smollm2-135m] [--clients 4] [--rounds 6] [--cut 3]
                              [--client-cpus 1] [--server-cpus 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hsplitlora.config import RunConfig  # noqa: E402
from hsplitlora.data.config import E2E_DIR  # noqa: E402
from hsplitlora.train.run import train  # noqa: E402


def config(args: argparse.Namespace, backend: str, out: Path) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"name": args.model},
        "lora": {"r": 8, "alpha": 32, "dropout": 0.0},
        "data": {"train_files": [str(E2E_DIR / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 400, "max_length": 128},
        "train": {"mode": "splitlora", "num_clients": args.clients, "cut": args.cut,
                  "steps": args.rounds, "batch_size": args.batch, "agg_interval": 2,
                  "lr": 1e-3, "seed": 0, "backend": backend},
        "ray": {"client_cpus": args.client_cpus, "server_cpus": args.server_cpus},
        "eval": {"max_examples": 0},
        "output": {"dir": str(out), "name": backend, "sample_prompt": None},
    })


def round_seconds(records: list[dict]) -> tuple[float, float]:
    """(wall seconds until round 0 ended, median seconds per later round) from the
    metrics: the first round includes starting the actors."""
    ends: dict[int, float] = {}
    for r in records:
        if "event" not in r:
            ends[r["round"]] = max(ends.get(r["round"], 0.0), r["wall"])
    walls = [ends[k] for k in sorted(ends)]
    return walls[0], statistics.median(b - a for a, b in zip(walls, walls[1:], strict=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--cut", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--client-cpus", type=float, default=1.0)
    ap.add_argument("--server-cpus", type=float, default=2.0,
                    help="the server does most of the arithmetic in SFL-V2")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("inprocess", "ray"):
            run = train(config(args, backend, Path(tmp)), write=False, show_progress=False)
            first, per_round = round_seconds(run.records)
            results[backend] = (first, per_round, run.summary["final_loss"])
    print(f"model {args.model}  splitlora  {args.clients} clients  cut {args.cut}  "
          f"batch {args.batch} x 128  {args.rounds} rounds")
    for backend, (first, per_round, loss) in results.items():
        print(f"{backend:9s}: first round done at {first:6.1f} s (actor start-up included), "
              f"then {per_round:.2f} s/round; final loss {loss:.6f}")
    ratio = results["ray"][1] / results["inprocess"][1]
    print(f"ray / inprocess, s/round: {ratio:.2f}")


if __name__ == "__main__":
    main()
