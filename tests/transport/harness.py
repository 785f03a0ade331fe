"""Real processes for networked tests, started in milliseconds.

Each party runs in its own process, forked from a fork server that imported torch,
transformers and the package once: a process per party as in a deployment, without paying
the multi-second imports per process. Parties exchange configs as JSON and write what the
test needs (the final adapter, the steps they saw) to files.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from hsplitlora.config import RunConfig
from hsplitlora.transport.config import NetConfig

CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["hsplitlora.train.run", "hsplitlora.transport.deploy",
                           "tests.transport.warm"])


def _logging(name: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format=f"[{name} %(relativeCreated)6.0f ms] %(name)s: %(message)s")


def _serve(cfg: dict, net: dict, kwargs: dict[str, Any]) -> None:
    from hsplitlora.transport.deploy import serve

    _logging("server")
    if kwargs.pop("sealed", False):  # the test's tripwire: no client adapter may reach here
        from hsplitlora.transport.hub import RemoteClient

        def refuse(self: RemoteClient) -> None:
            raise AssertionError(f"the main server asked client {self.client_id} for its "
                                 "adapter")

        RemoteClient.adapter_state = refuse  # type: ignore[method-assign,assignment]
    serve(RunConfig.model_validate(cfg), NetConfig.model_validate(net), **kwargs)


def _fed(cfg: dict, net: dict, kwargs: dict[str, Any]) -> None:
    from hsplitlora.transport.deploy import serve_fed

    _logging("fed")
    serve_fed(RunConfig.model_validate(cfg), NetConfig.model_validate(net), **kwargs)


def _join(cfg: dict, net: dict, client_id: int, address: str, out: str,
          kwargs: dict[str, Any], die_at: int | None, drop_at: int | None = None,
          hold_at: tuple[int, str] | None = None, joined: str | None = None,
          poison_at: int | None = None, wire_log: str | None = None) -> None:
    import dataclasses

    import torch

    from hsplitlora.roles.client import Client
    from hsplitlora.transport.client import Link
    from hsplitlora.transport.deploy import join

    _logging(f"client {client_id}")
    if die_at is not None or hold_at is not None:
        forward = Client.forward
        drawn = [0]

        def scripted_forward(self: Client) -> Any:
            if drawn[0] == die_at:  # the test's stand-in for a crash: SIGKILL in a round
                os.kill(os.getpid(), signal.SIGKILL)
            if hold_at is not None and drawn[0] == hold_at[0]:
                wait_for(Path(hold_at[1]).exists, 120, f"gate {hold_at[1]}")
            drawn[0] += 1
            return forward(self)

        Client.forward = scripted_forward  # type: ignore[method-assign]
    if poison_at is not None:  # a hostile client: finite but huge activations, once
        honest_forward = Client.forward
        sent = [0]

        def poisoned_forward(self: Client) -> Any:
            acts = honest_forward(self)
            sent[0] += 1
            if sent[0] == poison_at + 1:
                return dataclasses.replace(acts, hidden=torch.full_like(acts.hidden, 3.0e38))
            return acts

        Client.forward = poisoned_forward  # type: ignore[method-assign]
    if joined is not None:  # tell the test this client's hello is on its way
        opened = Link.__init__

        def opening(self: Link, *args: Any, **kw: Any) -> None:
            opened(self, *args, **kw)
            time.sleep(1.0)  # the hello travels and is queued for the next round boundary
            Path(joined).touch()

        Link.__init__ = opening  # type: ignore[method-assign]
    if wire_log is not None:
        _log_wire(Link, Path(wire_log))
    if drop_at is not None:  # a lost stream between forward and backward (not a crash)
        from hsplitlora.transport.client import RemoteMainServer

        step = RemoteMainServer.step
        calls = [0]

        def dropping_step(self: RemoteMainServer, cid: int, acts: Any) -> Any:
            calls[0] += 1
            if calls[0] == drop_at + 1:
                self.link._channel.close()  # the activations never leave; the call dies
            return step(self, cid, acts)

        RemoteMainServer.step = dropping_step  # type: ignore[method-assign]
    adapter = join(RunConfig.model_validate(cfg), NetConfig.model_validate(net), client_id,
                   address, **kwargs)
    save_file({k: v.contiguous() for k, v in adapter.items()}, out)


def _payload_bytes(blob: bytes) -> int:
    """The tensor bytes of a safetensors blob: all of it but the length word and header."""
    (header,) = struct.unpack("<Q", blob[:8])
    return len(blob) - 8 - header


def _log_wire(link: Any, path: Path) -> None:
    """Append one JSON line per blob the client sends or receives, on its link to the main
    server and on its calls to a fed server: direction, blob kind, round, the call's
    method (for calls), whole bytes and tensor payload bytes; the blob itself, as it
    travelled, goes to the file the line names (read it with :func:`wire_blob`)."""
    from hsplitlora.transport import fed
    from hsplitlora.transport.calls import read_call

    kept = path.with_suffix("")
    kept.mkdir(parents=True, exist_ok=True)

    def write(direction: str, kind: str, round: int, method: str | None, data: bytes) -> None:
        name = f"{kept.name}/{sum(1 for _ in kept.iterdir()):06d}.bin"
        (path.parent / name).write_bytes(data)
        with path.open("a") as f:
            f.write(json.dumps({"dir": direction, "kind": kind, "round": round,
                                "method": method, "bytes": len(data),
                                "payload": _payload_bytes(data), "file": name}) + "\n")

    send, receive = link.send, link.receive

    def logged_send(self: Any, kind: str, round: int, data: bytes) -> None:
        write("up", kind, round, None, data)
        send(self, kind, round, data)

    def logged_receive(self: Any, timeout: float) -> Any:
        blob = receive(self, timeout)
        if hasattr(blob, "data"):  # a blob, not a control message
            method = read_call(blob.data).method if blob.kind == "call" else None
            write("down", blob.kind, blob.round, method, blob.data)
        return blob

    link.send, link.receive = logged_send, logged_receive
    # the fed server: the adapter blob a client packs for upload, the aggregate it decodes
    pack, decode = fed.pack, fed._decode_adapter

    def logged_pack(*args: Any, **kw: Any) -> bytes:
        data = pack(*args, **kw)
        write("up", "adapter", -1, None, data)
        return data

    def logged_decode(data: bytes, *args: Any, **kw: Any) -> Any:
        write("down", "aggregate", -1, None, data)
        return decode(data, *args, **kw)

    fed.pack, fed._decode_adapter = logged_pack, logged_decode


def _cli(name: str, argv: list[str]) -> None:
    from hsplitlora.cli import app

    _logging(name)
    app(argv, prog_name="hsplitlora")


def _dump(model: Any) -> dict:
    return json.loads(model.model_dump_json())


def start(target: Callable[..., None], *args: Any) -> multiprocessing.Process:
    proc = CTX.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def start_server(cfg: RunConfig, net: NetConfig, **kwargs: Any) -> multiprocessing.Process:
    return start(_serve, _dump(cfg), _dump(net), kwargs)


def start_fed(cfg: RunConfig, net: NetConfig, **kwargs: Any) -> multiprocessing.Process:
    return start(_fed, _dump(cfg), _dump(net), kwargs)


def start_client(cfg: RunConfig, net: NetConfig, client_id: int, address: str, out: Path,
                 die_at: int | None = None, drop_at: int | None = None,
                 hold_at: tuple[int, Path] | None = None, joined: Path | None = None,
                 poison_at: int | None = None, wire_log: Path | None = None,
                 **kwargs: Any) -> multiprocessing.Process:
    """Client ``client_id`` in its own process; ``die_at=n`` kills it at its ``n``-th
    forward pass, ``drop_at=n`` closes its stream between its ``n``-th forward pass and
    the gradient (it reconnects), ``hold_at=(n, path)`` pauses it before its ``n``-th
    forward pass until ``path`` exists, ``joined=path`` creates ``path`` once its hello
    is sent (so a test can order a rejoin before a round without racing it), and
    ``poison_at=n`` makes its ``n``-th activations all 3e38 (finite, and poison);
    ``wire_log=path`` writes one line per blob its link carries (:func:`_log_wire`)."""
    return start(_join, _dump(cfg), _dump(net), client_id, address, str(out), kwargs, die_at,
                 drop_at, None if hold_at is None else (hold_at[0], str(hold_at[1])),
                 None if joined is None else str(joined), poison_at,
                 None if wire_log is None else str(wire_log))


def start_cli(name: str, *argv: str) -> multiprocessing.Process:
    """``hsplitlora ARGV`` in its own process (the exit code is the command's)."""
    return start(_cli, name, list(argv))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.02)


def finish(procs: list[multiprocessing.Process], timeout: float) -> list[int | None]:
    """Join every process (killing stragglers, so a failing test leaves none behind)."""
    end = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    return [p.exitcode for p in procs]


def serve_loopback(cfg: RunConfig, net: NetConfig, tmp_path: Path,
                   **kwargs: Any) -> tuple[multiprocessing.Process, str]:
    """A main-server process on a free loopback port, once it listens; and its address."""
    port_file = tmp_path / f"port-{len(list(tmp_path.glob('port-*')))}"
    proc = start_server(cfg, net, port_file=port_file, **kwargs)
    wait_for(port_file.exists, 60, "the main server to listen")
    return proc, f"127.0.0.1:{port_file.read_text()}"


def start_clients(cfg: RunConfig, net: NetConfig, address: str, tmp_path: Path,
                  die: dict[int, int] | None = None,
                  hold: dict[int, tuple[int, Path]] | None = None,
                  wire_logs: bool = False) -> list[multiprocessing.Process]:
    """One process per client of ``cfg``; client ``i`` writes ``client-i.safetensors``
    and, with ``die={i: n}``, is killed at its ``n``-th forward pass; ``hold={i: (n,
    path)}`` pauses it there until ``path`` exists; ``wire_logs``: client ``i`` logs its
    link's blobs to ``wire-i.jsonl`` (read them with :func:`wire_log`)."""
    die, hold = die or {}, hold or {}
    return [start_client(cfg, net, i, address, tmp_path / f"client-{i}.safetensors",
                         die_at=die.get(i), hold_at=hold.get(i),
                         wire_log=tmp_path / f"wire-{i}.jsonl" if wire_logs else None)
            for i in range(cfg.train.num_clients)]


def wire_log(tmp_path: Path, client_id: int) -> list[dict[str, Any]]:
    """What client ``client_id``'s link carried, one dict per blob (``wire_logs=True``)."""
    lines = (tmp_path / f"wire-{client_id}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def wire_blob(tmp_path: Path, entry: dict[str, Any]) -> bytes:
    """The bytes of one blob of a :func:`wire_log`, as the client's link carried them."""
    return (tmp_path / entry["file"]).read_bytes()


def records(run_dir: Path) -> list[dict[str, Any]]:
    """The run folder's metrics, one dict per line."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]

