"""What every command shares: the console, logging, a person's mistake printed as its
message with exit code 2, and the rule that a run folder is never silently replaced."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from hsplitlora.config import ConfigError
from hsplitlora.errors import UserError

__all__ = ["RUN_FILES", "check_run_folder", "console", "error_exit", "setup_logging",
           "user_errors"]

console = Console()

# What a run folder holds; --overwrite removes these, and nothing else, before a new run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "adapter",
             "checkpoint", "scores.json", "predictions.txt", "references.txt",
             "untuned_predictions.txt", "server_adapter.safetensors", "tensorboard", "wandb",
             "mlruns")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    logging.getLogger("hsplitlora").setLevel(logging.INFO)


def error_exit(err: BaseException, code: int = 2) -> typer.Exit:
    """Print an error's message (markup-safe) and return the exit to raise: code 2 for a
    person's mistake, 1 for a peer that failed or could not be reached."""
    # soft wrap: a path in the message stays whole, for the user to copy
    console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user error raised inside into its message and exit code 2."""
    try:
        yield
    except UserError as e:
        raise error_exit(e) from None


def check_run_folder(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """A run folder that holds a run is neither silently replaced nor mixed into: it
    takes --resume (go on) or --overwrite (start again)."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: pass one")
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume or not held:
        return
    if not overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(held)}): pass --resume to go on with "
            "it, --overwrite to replace it, or set output.name (--set output.name=NEW) for a "
            "new folder")
    for name in held:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


