"""Load on the main server: 16 clients over loopback with a tiny model, for a bounded time.

Prints steps per second through the server, p50 and p99 step latency as the clients see
it (upload to gradient, including the wait for the clients served before them), errors
(refused or missing steps, failed processes: must be 0) and the server's resident memory
when the first step lands and when the last does (growth must stay small: nothing may
accumulate per step). The clients run as threads in a few worker processes (each with its
own gRPC connection), so 16 of them fit on a small machine.

    python bench/net_load.py [--clients 16] [--workers 2] [--rounds 40] [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Set before torch loads OpenMP (it reads this once): idle threads sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hsplitlora.config import RunConfig  # noqa: E402
from hsplitlora.transport.config import NetConfig  # noqa: E402

E2E = REPO / "data" / "e2e" / "original" / "devset.csv"


def tiny_model_dir(out: Path) -> Path:
    """A 2-block Llama (hidden 64) and a 512-token BPE trained on E2E text, saved like a
    hub checkpoint: nothing to download, and the compute per step is negligible, so what
    is measured is the server's handling of streams."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from hsplitlora.data.e2e import load_e2e

    texts = [e.prompt + e.target for e in load_e2e([E2E])[:1000]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512,
                                                       special_tokens=["<unk>", "<eos>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                                unk_token="<unk>", pad_token="<eos>")
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=len(fast), max_position_embeddings=256,
                                      bos_token_id=None, eos_token_id=fast.eos_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def run_config(model_dir: Path, out: Path, clients: int, rounds: int) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"name": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_files": [str(E2E)], "eval_file": None,
                 "max_train_examples": 20 * clients, "max_length": 160},
        "train": {"mode": "splitlora", "num_clients": clients, "cut": 1, "steps": rounds,
                  "batch_size": 2, "agg_interval": 4, "precision": "fp32", "seed": 0,
                  "threads": 1},
        "eval": {"max_examples": 0},
        "output": {"dir": str(out), "name": "load", "sample_prompt": None},
    })


# -- roles (this script, re-invoked) -------------------------------------------------------
def serve_role(cfg: RunConfig, net: NetConfig, port_file: Path) -> None:
    from hsplitlora.transport.deploy import serve

    serve(cfg, net, port_file=port_file)


def clients_role(cfg: RunConfig, net: NetConfig, ids: list[int], address: str,
                 out: Path) -> None:
    """Several clients, one thread each, sharing one prepared copy of the data."""
    from hsplitlora.train.run import prepare
    from hsplitlora.transport.client import ClientRunner
    from hsplitlora.transport.parties import build_client

    p = prepare(cfg)
    runners = [ClientRunner(build_client(p, i), net, address, mode=cfg.train.mode) for i in ids]
    errors: list[str] = []

    def run(runner: ClientRunner) -> None:
        try:
            runner.run()
        except Exception as e:  # counted and reported, not lost in a thread
            errors.append(f"client {runner.client_id}: {e}")

    threads = [threading.Thread(target=run, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.write_text(json.dumps({"errors": errors,
                               "latency_s": [h["latency_s"] for r in runners
                                             for h in r.history]}))


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=["server", "clients"], help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    ap.add_argument("--net", help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="client processes")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=600, help="hard limit for the run (s)")
    args = ap.parse_args()
    if args.role:
        import logging

        logging.basicConfig(level=logging.WARNING, format=f"[{args.role}] %(message)s")
        cfg = RunConfig.model_validate_json(Path(args.cfg).read_text())
        net = NetConfig.model_validate_json(Path(args.net).read_text())
        if args.role == "server":
            serve_role(cfg, net, Path(args.port_file))
        else:
            clients_role(cfg, net, [int(i) for i in args.ids.split(",")], args.address,
                         Path(args.out))
        return

    import psutil

    work = Path(tempfile.mkdtemp(prefix="net-load-"))
    cfg = run_config(tiny_model_dir(work / "tiny"), work, args.clients, args.rounds)
    net = NetConfig(port=0, step_timeout_s=60, join_timeout_s=300)
    (work / "cfg.json").write_text(cfg.model_dump_json())
    (work / "net.json").write_text(net.model_dump_json())
    common = ["--cfg", str(work / "cfg.json"), "--net", str(work / "net.json")]
    port_file = work / "port"
    server = spawn("--role", "server", *common, "--port-file", str(port_file))
    end = time.monotonic() + args.timeout
    while not port_file.exists():
        if time.monotonic() > end or server.poll() is not None:
            raise SystemExit("the main server did not start")
        time.sleep(0.1)
    address = f"127.0.0.1:{port_file.read_text()}"
    groups = [list(range(args.clients))[w::args.workers] for w in range(args.workers)]
    outs = [work / f"worker-{w}.json" for w in range(args.workers)]
    workers = [spawn("--role", "clients", *common, "--ids", ",".join(map(str, g)),
                     "--address", address, "--out", str(o)) for g, o in zip(groups, outs,
                                                                           strict=True)]
    metrics = work / "load" / "metrics.jsonl"
    proc = psutil.Process(server.pid)
    rss_start = rss_end = rss_max = 0
    while server.poll() is None and time.monotonic() < end:
        try:
            rss = proc.memory_info().rss
        except psutil.NoSuchProcess:
            break
        if not rss_start and metrics.exists() and metrics.stat().st_size:
            rss_start = rss
        if rss_start:
            rss_end, rss_max = rss, max(rss_max, rss)
        time.sleep(0.2)
    timed_out = server.poll() is None
    for p in [server, *workers]:
        if timed_out:
            p.kill()
        p.wait(60)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    reports = [json.loads(o.read_text()) for o in outs if o.exists()]
    latency = [x for rep in reports for x in rep["latency_s"]]
    errors = [e for rep in reports for e in rep["errors"]]
    missing = args.clients * args.rounds - len(steps)
    failed = [p.returncode for p in [server, *workers] if p.returncode]
    span = steps[-1]["wall"] - steps[0]["wall"]
    mb = 2**20
    print(f"\n{args.clients} clients on loopback, tiny Llama (2 blocks, hidden 64), cut 1, "
          f"batch 2, {args.rounds} rounds, {args.workers} client processes")
    print(f"steps/s through the server : {(len(steps) - 1) / span:.1f} "
          f"({len(steps)} steps in {span:.1f} s)")
    print(f"step latency p50 / p99     : {statistics.median(latency) * 1e3:.1f} ms / "
          f"{percentile(latency, 0.99) * 1e3:.1f} ms ({len(latency)} steps seen by clients)")
    print(f"errors                     : {len(errors) + max(missing, 0) + len(failed)} "
          f"(client errors {errors}, missing steps {missing}, failed processes {failed}"
          f"{', TIMED OUT' if timed_out else ''})")
    print(f"server RSS first/last step : {rss_start / mb:.0f} MB / {rss_end / mb:.0f} MB "
          f"(max {rss_max / mb:.0f} MB, growth {(rss_end - rss_start) / mb:+.1f} MB)")


if __name__ == "__main__":
    main()
