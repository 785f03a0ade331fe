"""Command line: ``hsplitlora train --config FILE``."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from hsplitlora.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Split federated LoRA fine-tuning (SplitLoRA, HSplitLoRA).")
console = Console()


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    logging.getLogger("hsplitlora").setLevel(logging.INFO)


@app.callback()
def main() -> None:
    """Split federated LoRA fine-tuning (SplitLoRA, HSplitLoRA)."""


@app.command()
def train(
    config: Path = typer.Option(None, "--config", "-c", help="YAML run configuration"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set train.steps=20"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bar"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log transformers' info too"),
) -> None:
    """Train one run (mode, model, data from the config); writes a run folder."""
    _logging(verbose)
    try:
        cfg = load_config(config, set_)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    from hsplitlora.train.run import train as run_training

    result = run_training(cfg, show_progress=not no_progress)
    s = result.summary
    table = Table(title=f"{s['mode']} on {s['model']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("clients", "cut", "rank", "steps", "first_loss", "final_loss", "eval_loss",
                "eval_ppl", "seconds_per_step", "bytes_up", "bytes_down",
                "client_trainable_params"):
        if key in s:
            v = s[key]
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    for when in ("before", "after"):
        if when in result.samples:
            console.print(f"[bold]{when} fine-tuning:[/bold] {result.samples[when]}")
    console.print(f"run folder: {result.run_dir}")


if __name__ == "__main__":
    app()
