"""Command line for deployments: ``hsplitlora serve``, ``join`` and ``fedserver``.

Every party reads the same config file (its ``net`` section says where and how to talk),
so a run starts the same way on one machine over loopback and on many; docs/deploy.md
walks through both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from hsplitlora.errors import UserError
from hsplitlora.terminal import check_run_folder, console, error_exit, setup_logging
from hsplitlora.transport.security import AuthError, ConnectionFailed, Refused

if TYPE_CHECKING:

    from hsplitlora.config import RunConfig

__all__ = ["register"]

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML run configuration "
                                         "(the same file for every party)")]
SetOpt = Annotated[list[str], typer.Option("--set", help="override, e.g. --set net.port=6000")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="log more")]
PortFileOpt = Annotated[Path | None, typer.Option(
    "--port-file", help="write the port listened on here (useful with net.port 0)")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="continue from the checkpoint in the run folder")]

# What a person can act on (unreachable or refusing peers, missing files, a plan that does
# not fit); anything else is a bug and keeps its traceback.
_FAILURES = (AuthError, ConnectionFailed, Refused, TimeoutError, FileNotFoundError, ValueError,
             UserError)


def _start(config: Path, overrides: list[str], verbose: bool) -> RunConfig:
    """Logging on, config loaded and validated (a bad one exits with code 2)."""
    from hsplitlora.config import ConfigError, load_config
    from hsplitlora.modes import MODES

    setup_logging(verbose)
    try:
        cfg = load_config(config, overrides)
        if "grpc" not in cfg.mode.placements:
            networked = [m.name for m in MODES.values() if "grpc" in m.placements]
            raise ConfigError(  # checked here, before any party loads the model
                f"train.mode {cfg.train.mode!r} cannot run over the network: serve and join "
                f"run {', '.join(networked)}; {cfg.train.mode} has no main server to serve "
                "(use hsplitlora train, or --backend ray to spread it over machines)")
        return cfg
    except ConfigError as e:
        raise error_exit(e) from None


def _fail(err: BaseException) -> typer.Exit:
    """Exit code 2 for a person's mistake (config, data, model, plan), 1 for a peer that
    failed or could not be reached."""
    return error_exit(err, 2 if isinstance(err, UserError) else 1)


def serve(config: ConfigOpt, set_: SetOpt = [], resume: ResumeOpt = False,  # noqa: B006
          port_file: PortFileOpt = None,
          overwrite: Annotated[bool, typer.Option(
              "--overwrite", help="replace the run already in the run folder")] = False,
          no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
          verbose: VerboseOpt = False) -> None:
    """Run the main server (and the fed server, unless net.fed_address names another)."""
    cfg = _start(config, set_, verbose)
    from hsplitlora.transport.deploy import serve as run_server

    try:
        name = cfg.output.name or f"{cfg.train.mode}-serve"
        check_run_folder(Path(cfg.output.dir) / name, resume=resume, overwrite=overwrite)
        run_dir = run_server(cfg, cfg.net, resume=resume, port_file=port_file,
                             show_progress=not no_progress)
    except _FAILURES as e:
        raise _fail(e) from None
    console.print(f"run folder: {run_dir}")


def join(
    config: ConfigOpt,
    client_id: Annotated[int, typer.Option("--client-id", min=0, help="this client's id")],
    server: Annotated[str | None, typer.Option(
        "--server", help="main server HOST:PORT; default net.host:net.port")] = None,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="file holding this client's token (or set HSPLITLORA_TOKEN)")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="where the client checkpoints itself each round; default "
        "<output.dir>/<name>-client-<id>/checkpoint.pt")] = None,
    resume: ResumeOpt = False,
    set_: SetOpt = [],  # noqa: B006
    verbose: VerboseOpt = False,
) -> None:
    """Join a run as one client: train on its own shard until the server ends the run."""
    cfg = _start(config, set_, verbose)
    from safetensors.torch import save_file

    from hsplitlora.transport.deploy import join as run_client
    from hsplitlora.transport.deploy import run_folder

    folder = run_folder(cfg, f"client-{client_id}")
    token = (token_file.read_text(encoding="utf-8").strip() if token_file
             else os.environ.get("HSPLITLORA_TOKEN"))
    try:
        adapter = run_client(cfg, cfg.net, client_id, server or f"{cfg.net.host}:{cfg.net.port}",
                             token=token, checkpoint=checkpoint or folder / "checkpoint.pt",
                             resume=resume)
    except _FAILURES as e:
        raise _fail(e) from None
    save_file({k: v.contiguous() for k, v in adapter.items()},
              str(folder / "client_adapter.safetensors"))
    console.print(f"client {client_id} done; its adapter: {folder / 'client_adapter.safetensors'}")


def fedserver(config: ConfigOpt, set_: SetOpt = [], resume: ResumeOpt = False,  # noqa: B006
              port_file: PortFileOpt = None, verbose: VerboseOpt = False) -> None:
    """Run the fed server in its own process (listens on net.fed_port), so the main server
    never sees client-side adapters; point the others at it with net.fed_address."""
    cfg = _start(config, set_, verbose)
    from hsplitlora.transport.deploy import serve_fed

    try:
        run_dir = serve_fed(cfg, cfg.net, resume=resume, port_file=port_file)
    except _FAILURES as e:
        raise _fail(e) from None
    if cfg.mode.planned:
        console.print("fed server done; the main server's run folder holds the result")
    else:
        console.print(f"fed server done; the client-side adapter is in {run_dir}")


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``join`` and ``fedserver`` to the main ``hsplitlora`` app."""
    app.command()(serve)
    app.command()(join)
    app.command()(fedserver)
