"""Honest throughput and server memory under hostile connections (loopback, bounded).

A main server (tiny Llama, the tests' live server) runs in its own process with tokens;
client 1 is honest and steps as fast as the server answers; an attacker holding client
0's token (a compromised client), or no valid token at all, keeps N connections of one
kind open, reopening each as soon as the server closes it:

- ``helloless``: Train streams that never send a hello (they used to hold a worker each)
- ``flood``: a hello, then complete 4 MB junk uploads, back to back
- ``malformed``: a hello, then the 80-byte header that used to kill the server, repeated
- ``unauth``: calls with a wrong token

Each connection is reopened ``--retry-s`` (1 s) after the server closes it (and stops
sending into a call the server ended, so its CPU goes into new calls); with ``--retry-s
0.05`` the attack becomes a connection flood: the per-address call rate limit
(``net.peer_calls_per_s``) refuses the calls past it before reading anything, and the TCP
and HTTP/2 handshakes are left to a firewall.

For N in 0, 50 and 200 per kind it prints honest steps per second (and the ratio to N=0),
the server's resident memory growth over its N=0 baseline, and the CPU the server and the
attacker used over the measurement (in cores: 1.0 = one core busy); the targets are a
ratio >= 0.8 and growth <= 100 MB. With 3 or more cores the attacker is pinned to cores of
its own (``os.sched_setaffinity``), as it would be on its own machine, so the ratio
measures what the attack costs the server; with fewer, every party shares the cores and
the attacker runs at the lowest CPU priority (``nice 19``: it gets the cycles the server
and the honest client leave idle, the nearest one host comes to a machine of its own;
the table says ``shared, attacker niced``). ``--same-priority`` runs it at the server's
priority instead, so its own CPU counts against the honest client too (the
``attacker_cpu`` column says how much; the table says ``shared``).

    python bench/net_abuse.py [--levels 0,50,200] [--kinds helloless,flood,malformed,unauth]
                              [--seconds 4] [--same-priority]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TOKENS = {"0": "token-0", "1": "token-1"}
KINDS = ("helloless", "flood", "malformed", "unauth")
KILLER = b'{"hidden":{"dtype":"F32","shape":[2,40,1e400],"data_offsets":[0,4]}}'


def serve(port_file: Path) -> None:
    """The server process: the live test server, run until killed."""
    from hsplitlora.transport.config import NetConfig
    from tests.transport.live import start_live

    net = NetConfig(step_timeout_s=2, join_timeout_s=1, min_clients=1)
    live = start_live(net, num_clients=2, steps=10**7, interval=10**7, tokens=TOKENS)
    port_file.write_text(str(live.port))
    live.thread.join()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cores() -> tuple[set[int], set[int]] | None:
    """(cores for the server and the honest client, cores for the attacker), or None when
    there are too few to keep them apart."""
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 3:
        return None
    split = max(1, len(mine) // 3)
    return set(mine[:-split]), set(mine[-split:])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


_FRAMES: dict[str, list] = {}  # made once per kind: the attacker's own CPU is not the test


def hostile_frames(kind: str, stop: threading.Event, ended: threading.Event) -> Iterator:
    from hsplitlora.transport import hsplitlora_pb2 as pb
    from hsplitlora.transport.wire import frames

    if kind not in _FRAMES:
        out = []
        if kind != "helloless":
            out.append(pb.ClientFrame(hello=pb.Hello(client_id=0, cut=2, num_samples=10,
                                                     codec="none", mode="splitlora")))
        if kind in ("flood", "malformed"):
            blob = (b"\x07" * (4 << 20) if kind == "flood"
                    else len(KILLER).to_bytes(8, "little") + KILLER + b"\0" * 4)
            out += [pb.ClientFrame(chunk=f) for f in frames(blob, "acts", 0, 0, 1 << 20)]
        _FRAMES[kind] = out
    hello, uploads = _FRAMES[kind][:1], _FRAMES[kind][1:]
    yield from hello if kind != "helloless" else _FRAMES[kind]
    for seq in range(250 if uploads else 0):
        if stop.is_set() or ended.is_set():
            return
        for f in uploads:  # a fresh sequence number per upload, as a client would send
            c = f.chunk
            yield pb.ClientFrame(chunk=pb.Chunk(seq=seq, kind=c.kind, round=c.round,
                                                total_bytes=c.total_bytes, index=c.index,
                                                last=c.last, data=c.data))
    while not (stop.is_set() or ended.is_set()):  # hold the stream until the server ends it
        ended.wait(0.2)


def attacker(address: str, kind: str, stop: threading.Event, net, retry_s: float) -> None:
    """One hostile connection, reopened ``retry_s`` after the server ends it."""
    import grpc

    from hsplitlora.transport import hsplitlora_pb2_grpc as pb_grpc
    from hsplitlora.transport.security import call_metadata, open_channel

    token = "wrong" if kind == "unauth" else TOKENS["0"]
    while not stop.is_set():
        channel, ended = open_channel(address, net), threading.Event()
        try:
            call = pb_grpc.SplitTrainingStub(channel).Train(
                hostile_frames(kind, stop, ended), metadata=call_metadata("0", token))
            for _ in call:
                pass
        except grpc.RpcError:
            pass
        finally:
            ended.set()
            channel.close()
        stop.wait(retry_s)


def attack(address: str, kind: str, n: int, retry_s: float) -> None:
    """The attacker process: ``n`` hostile connections of ``kind`` until killed."""
    from hsplitlora.transport.config import NetConfig

    stop, net = threading.Event(), NetConfig()
    threads = [threading.Thread(target=attacker, args=(address, kind, stop, net, retry_s),
                                daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    stop.wait()


def honest_rate(link, state: dict, seconds: float) -> float:
    """Steps per second of the honest client over ``seconds``."""
    from tests.transport.live import activations, remote

    good = remote(link)
    end, steps = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        good.round = state["round"]
        good.step(1, activations(steps))
        state["round"] += 1
        steps += 1
    return steps / seconds


def run_kind(kind: str, levels: list[int], seconds: float, retry_s: float,
             same_priority: bool = False) -> list[dict]:
    from hsplitlora.transport import hsplitlora_pb2 as pb
    from hsplitlora.transport.client import Link
    from hsplitlora.transport.config import NetConfig

    split = cores()
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)],
                                  env={**os.environ, "PYTHONPATH": str(REPO)},
                                  stderr=subprocess.DEVNULL)
        if split is not None:  # the server and this (honest) process on one set of cores
            os.sched_setaffinity(server.pid, split[0])
            os.sched_setaffinity(0, split[0])
        try:
            while not port_file.exists():
                time.sleep(0.1)
            time.sleep(0.2)
            address = f"127.0.0.1:{port_file.read_text()}"
            net = NetConfig()
            hello = pb.Hello(client_id=1, cut=2, num_samples=11, codec="none",
                             mode="splitlora")
            link = Link(address, net, hello, TOKENS["1"])
            state = {"round": link.welcome(30).round}
            honest_rate(link, state, 1.0)  # warm up
            base_rss, base_rate, rows = rss_mb(server.pid), None, []
            for n in levels:
                # The attacker in its own process: its threads must not share the honest
                # client's interpreter lock.
                # On shared cores, unless asked otherwise, the attacker runs at the lowest
                # CPU priority: it gets only what the server and the honest client leave
                # idle, as on a machine of its own, so what remains is the attack's cost to
                # the server (the nearest one host comes to separate cores).
                niced = split is None and not same_priority
                attack = subprocess.Popen(
                    [sys.executable, __file__, "--attack", address, "--kinds", kind,
                     "--levels", str(n), "--retry-s", str(retry_s)],
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                    preexec_fn=(lambda: os.nice(19)) if niced else None,
                    stderr=subprocess.DEVNULL) if n else None
                if attack is not None and split is not None:
                    os.sched_setaffinity(attack.pid, split[1])
                if n:  # let the attack build up (stepping on: an idle client is dropped)
                    honest_rate(link, state, 3.0)
                used = [cpu_s(server.pid), cpu_s(attack.pid) if attack else 0.0]
                start = time.monotonic()
                rate = honest_rate(link, state, seconds)
                wall = time.monotonic() - start
                used = [(cpu_s(server.pid) - used[0]) / wall,
                        (cpu_s(attack.pid) - used[1]) / wall if attack else 0.0]
                peak = rss_mb(server.pid)
                if attack is not None:
                    attack.kill()
                    attack.wait(10)
                base_rate = rate if base_rate is None else base_rate
                rows.append({"kind": kind, "hostile": n, "steps_per_s": round(rate, 1),
                             "ratio": round(rate / base_rate, 2),
                             "rss_growth_mb": round(peak - base_rss, 1),
                             "server_cpu": round(used[0], 2), "attacker_cpu": round(used[1], 2),
                             "cores": "separate" if split is not None else (
                                 "shared" if same_priority else "shared, attacker niced")})
                print(json.dumps(rows[-1]), flush=True)
            link.close()
            return rows
        finally:
            server.kill()
            server.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="0,50,200")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--retry-s", type=float, default=1.0,
                    help="how soon an attacker reopens a connection the server closed")
    ap.add_argument("--same-priority", action="store_true",
                    help="on shared cores, run the attacker at the server's CPU priority "
                         "(then its own CPU use counts against the honest client)")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--attack", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    if args.attack is not None:
        attack(args.attack, args.kinds, int(args.levels), args.retry_s)
        return
    levels = [int(x) for x in args.levels.split(",")]
    rows = [row for kind in args.kinds.split(",")
            for row in run_kind(kind, levels, args.seconds, args.retry_s, args.same_priority)]
    worst = min(r["ratio"] for r in rows)
    growth = max(r["rss_growth_mb"] for r in rows)
    print(f"worst honest throughput ratio {worst:.2f} (target >= 0.8): "
          f"{'met' if worst >= 0.8 else 'MISSED'}")
    print(f"largest server RSS growth {growth:.1f} MB (target <= 100 MB): "
          f"{'met' if growth <= 100 else 'MISSED'}")


if __name__ == "__main__":
    main()
