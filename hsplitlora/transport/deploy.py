"""The three processes of a deployment, each from one config: main server, client, fed server.

These are what ``hsplitlora serve``, ``join`` and ``fedserver`` run. Each builds its party
from the same config (see :mod:`hsplitlora.transport.parties`), so starting a run on one
machine over loopback and on many machines differs only in addresses.

The main server's run folder is ``output.dir/output.name`` (``<mode>-serve`` when no name
is set, so ``serve --resume`` finds it again) and holds ``config.yaml``, ``metrics.jsonl``
(wire bytes per step), ``checkpoint/server.pt`` and, at the end, ``adapter/`` (PEFT layout)
and ``summary.json``. With a separate fed server the main server never holds the
client-side adapter, so it writes ``server_adapter.safetensors`` and the fed server writes
``client_adapter.safetensors`` into its own folder. In the heterogeneous modes the main
server only ever receives aggregates from a separate fed server, and writes the whole
run folder (the merged or aggregated global model) itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch
from safetensors.torch import save_file

from hsplitlora.checkpoint import load_checkpoint
from hsplitlora.config import RunConfig
from hsplitlora.models.lora import matrix_shapes, save_peft_adapter
from hsplitlora.models.split import arch_spec
from hsplitlora.privacy.accountant import privacy_report
from hsplitlora.report import plot_loss
from hsplitlora.train.recorder import Recorder, kept_records
from hsplitlora.train.run import base_source, check_same_run, checkpoint_path, prepare
from hsplitlora.train.trackers import open_sinks
from hsplitlora.transport import hsplitlora_pb2_grpc as pb_grpc
from hsplitlora.transport.client import ClientRunner
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.fed import FederationServicer, FedService, RemoteFed
from hsplitlora.transport.hetero_fed import HeteroFedService
from hsplitlora.transport.limits import StreamGate, peer_rate_limit
from hsplitlora.transport.parties import (
    build_client,
    build_fed,
    build_fed_service,
    build_server,
)
from hsplitlora.transport.security import Authenticator, bind, load_tokens, options
from hsplitlora.transport.server import Coordinator, listen

__all__ = ["join", "run_folder", "serve", "serve_fed"]

log = logging.getLogger(__name__)

_GRACE_S = 5.0  # let in-flight calls (a last aggregate download) finish on shutdown


def run_folder(cfg: RunConfig, role: str = "serve") -> Path:
    """``output.dir/output.name`` for the main server, ``<name>-fed`` for a fed server
    (a fixed name either way, so ``--resume`` finds it again)."""
    name = cfg.output.name or f"{cfg.train.mode}-serve"
    path = Path(cfg.output.dir) / (name if role == "serve" else f"{name}-{role}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_port(port_file: Path | None, port: int) -> None:
    """Publish the bound port (``net.port: 0`` picks a free one) for scripts and tests."""
    if port_file is None:
        return
    tmp = port_file.with_name(f".{port_file.name}.tmp")
    tmp.write_text(str(port), encoding="utf-8")
    os.replace(tmp, port_file)


def _tokens(net: NetConfig) -> dict[str, str] | None:
    return load_tokens(net.tokens_file) if net.tokens_file is not None else None


def _serve_hetero(cfg: RunConfig, net: NetConfig, resume: bool, port_file: Path | None,
                  show_progress: bool) -> Path:
    """The main server of a heterogeneous run: the ordinary training run with the clients
    remote (:class:`~hsplitlora.transport.hub.HeteroHub`), checkpointed as every round
    ends; it writes the same run folder as ``hsplitlora train``, in ``run_folder(cfg)``."""
    from hsplitlora.train.run import train
    from hsplitlora.transport.hub import HeteroHub

    run_dir = run_folder(cfg)
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"name": run_dir.name})})
    hub = HeteroHub(cfg, net, _tokens(net), port_file=port_file)
    try:
        result = train(cfg, show_progress=show_progress, placement=hub.bind, checkpoint=True,
                       resume=resume)
    finally:
        hub.close()
    assert result.run_dir is not None
    return result.run_dir


def serve(cfg: RunConfig, net: NetConfig, *, resume: bool = False,
          port_file: Path | None = None, show_progress: bool = False) -> Path:
    """Run the main server (and, unless ``net.fed_address`` is set, the fed server) until
    the last round; returns the run folder."""
    if cfg.mode.planned:
        return _serve_hetero(cfg, net, resume, port_file, show_progress)
    start = time.perf_counter()
    p = prepare(cfg)
    server, plan = build_server(p)
    run_dir = run_folder(cfg)
    checkpoint = checkpoint_path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    tokens = _tokens(net)
    fed: FedService | RemoteFed
    if net.fed_address is None:
        fed = build_fed_service(p, net)
    else:
        fed = RemoteFed(net.fed_address, net, "server", (tokens or {}).get("server"))
    first_round, step = 0, 0
    if resume:
        state = load_checkpoint(checkpoint)
        check_same_run(state["config"], cfg)
        server.load_state_dict(state["server"])
        if isinstance(fed, FedService) and state["fed"] is not None:
            fed.load_state_dict(state["fed"])
        first_round, step = state["round"] + 1, state["step"]
        kept_records(metrics, state["round"])
        log.info("resuming from the checkpoint of round %d", state["round"])
    else:
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        metrics.unlink(missing_ok=True)
        checkpoint.unlink(missing_ok=True)
    with Recorder(metrics, plan.steps, show_progress=show_progress,
                  description=f"serve {plan.mode}",
                  sinks=open_sinks(cfg.output, run_dir, cfg.model_dump(mode="json"))) as rec:
        rec.step = step
        coordinator = Coordinator(server, plan, net, fed, rec, start_round=first_round,
                                  checkpoint=checkpoint,
                                  run_info={"config": cfg.model_dump(mode="json")},
                                  server_fed=build_fed(p) if cfg.mode.server == "per_participant"
                                  else None)
        grpc_server, port = listen(coordinator, net, tokens)
        _write_port(port_file, port)
        log.info("main server listening on %s:%d for %d clients", net.host, port,
                 plan.num_clients)
        try:
            coordinator.run()
        finally:
            grpc_server.stop(_GRACE_S).wait()
            if isinstance(fed, RemoteFed):
                fed.close()
        spent = {}
        if cfg.privacy.enabled:  # counted from the steps and aggregations the server saw
            spent = privacy_report(cfg, dict(enumerate(len(s) for s in p.shards)), rec.records)
            rec.event("privacy", round=plan.steps - 1, **spent)
        records = rec.records
    final = server.adapter_state()
    client_side = fed.latest_state() if isinstance(fed, FedService) else None
    if client_side is not None:
        save_peft_adapter({**client_side, **final}, p.lora, run_dir / "adapter",
                          base_model=base_source(cfg),
                          fan_in_fan_out=arch_spec(p.model.config).fan_in_fan_out,
                          spec=arch_spec(p.model.config))
    else:
        save_file({k: v.contiguous() for k, v in final.items()},
                  str(run_dir / "server_adapter.safetensors"))
    _write_summary(run_dir, cfg, records, time.perf_counter() - start, net, spent)
    plot_loss(records, run_dir / "loss.png", title=f"{cfg.train.mode} ({cfg.model.name}), "
              "served")
    return run_dir


def _write_summary(run_dir: Path, cfg: RunConfig, records: list[dict[str, Any]], wall: float,
                   net: NetConfig, privacy: Mapping[str, Any]) -> None:
    """The in-process run's summary keys (those a server can know, the privacy spent
    among them), plus the wire's."""
    steps = [r for r in records if "event" not in r]
    rounds = [r["round"] for r in steps]

    def mean_loss(round: int) -> float | None:
        losses = [r["loss"] for r in steps if r["round"] == round]
        return sum(losses) / len(losses) if losses else None

    summary = {
        "mode": cfg.train.mode, "model": cfg.model.name, "clients": cfg.train.num_clients,
        "cut": cfg.train.cut, "rank": cfg.lora.r,
        "steps": len(steps), "wall_s": wall, "seconds_per_step": wall / max(len(steps), 1),
        "first_loss": mean_loss(min(rounds)) if rounds else None,
        "final_loss": mean_loss(max(rounds)) if rounds else None,
        "tokens": sum(r.get("tokens", 0) for r in steps),
        "bytes_up": sum(r.get("bytes_up", 0) for r in records),
        "bytes_down": sum(r.get("bytes_down", 0) for r in records),
        "codec": net.codec,
        "bytes_up_per_step": sum(r["bytes_up"] for r in steps) / max(len(steps), 1),
        "bytes_down_per_step": sum(r["bytes_down"] for r in steps) / max(len(steps), 1),
        **privacy,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


def join(cfg: RunConfig, net: NetConfig, client_id: int, server: str, *,
         token: str | None = None, checkpoint: Path | None = None,
         resume: bool = False) -> dict[str, torch.Tensor]:
    """Run client ``client_id`` against the main server at ``server`` (HOST:PORT) until the
    run is over; returns its final adapter (the last aggregate)."""
    if cfg.mode.planned:
        from hsplitlora.transport.host import RoleHost

        p = prepare(cfg)
        return RoleHost(p, client_id, net, server, token=token, device=p.device,
                        checkpoint=checkpoint, resume=resume).run()
    p = prepare(cfg)
    party = build_client(p, client_id)
    runner = ClientRunner(party, net, server, mode=cfg.train.mode, fed=net.fed_address,
                          token=token, device=p.device, checkpoint=checkpoint, resume=resume)
    return runner.run()


def serve_fed(cfg: RunConfig, net: NetConfig, *, resume: bool = False,
              port_file: Path | None = None) -> Path:
    """Run the fed server in its own process until the last round is aggregated (in the
    heterogeneous modes: until the main server says the run is over)."""
    p = prepare(cfg)  # for the adapter layout it must accept; it never sees activations
    run_dir = run_folder(cfg, "fed")
    last = cfg.train.steps - 1
    fed: FedService | HeteroFedService
    if cfg.mode.planned:
        from hsplitlora.hetero.planner import aggregator_for

        if resume:
            log.info("the fed server of a %s run keeps nothing between rounds: it serves the "
                     "next round the main server resumes at", cfg.train.mode)
        spec = arch_spec(p.model.config)
        fed = HeteroFedService(aggregator_for(cfg),
                               cfg.lora.alpha, matrix_shapes(p.model, spec.targets), spec,
                               net.step_timeout_s, last,
                               ranks=[cfg.lora.r, *cfg.hetero.rank_set])
    else:
        checkpoint = run_dir / "checkpoint" / "fed.pt"
        fed = build_fed_service(p, net, checkpoint=checkpoint)
        if resume:
            fed.load_state_dict(load_checkpoint(checkpoint))
    n = cfg.train.num_clients
    gate = StreamGate({"Federation": net.streams_per_party},
                      {"Federation": net.streams_per_party * (n + 1)})
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=gate.workers), options=options(net),
                              maximum_concurrent_rpcs=gate.workers,
                              interceptors=[peer_rate_limit(net)])
    auth = Authenticator(_tokens(net), {*(str(i) for i in range(n)), "server"}, net)
    pb_grpc.add_FederationServicer_to_server(FederationServicer(fed, auth, net, gate),
                                             grpc_server)
    port = bind(grpc_server, f"{net.host}:{net.fed_port}", net)
    grpc_server.start()
    _write_port(port_file, port)
    log.info("fed server listening on %s:%d", net.host, port)
    try:
        if isinstance(fed, HeteroFedService):
            while not fed.finished.wait(60.0):
                pass
            return run_dir
        while fed.latest(last, 60.0) is None:
            pass
    finally:
        grpc_server.stop(_GRACE_S).wait()
    state = fed.latest_state()
    assert state is not None
    save_file({k: v.contiguous() for k, v in state.items()},
              str(run_dir / "client_adapter.safetensors"))
    return run_dir
