"""Command line: ``hsplitlora train --config FILE``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from hsplitlora.config import ConfigError, RunConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Split federated LoRA fine-tuning (SplitLoRA, HSplitLoRA).")
console = Console()


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    logging.getLogger("hsplitlora").setLevel(logging.INFO)


def _config(path: Path | None, overrides: list[str]) -> RunConfig:
    """The validated config, or the validation message and exit code 2."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@app.callback()
def main() -> None:
    """Split federated LoRA fine-tuning (SplitLoRA, HSplitLoRA)."""


@app.command()
def train(
    config: Path = typer.Option(None, "--config", "-c", help="YAML run configuration"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set train.steps=20"),
    backend: str = typer.Option(None, "--backend", help="where the roles run: inprocess, or "
                                "ray (each client and the main server a Ray actor; the "
                                "config's ray section says where and with what)"),
    checkpoint: bool = typer.Option(False, "--checkpoint", help="save the run's state as "
                                    "rounds end (<run folder>/checkpoint/server.pt)"),
    resume: bool = typer.Option(False, "--resume", help="go on from the run folder's "
                                "checkpoint (same config; keeps checkpointing)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bar"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log transformers' info too"),
) -> None:
    """Train one run (mode, model, data from the config); writes a run folder."""
    _logging(verbose)
    cfg = _config(config, [*set_, *([f"train.backend={backend}"] if backend else [])])
    from hsplitlora.checkpoint import CheckpointError
    from hsplitlora.hetero.planner import PlanError
    from hsplitlora.train.run import train as run_training

    # Errors found once the model and data are known, or no checkpoint to resume from.
    try:
        result = run_training(cfg, show_progress=not no_progress,
                              checkpoint=checkpoint or resume, resume=resume)
    except (ConfigError, PlanError, FileNotFoundError, CheckpointError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
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


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run folder written by `hsplitlora train`")],
    max_mrs: Annotated[int | None, typer.Option(
        "--max-mrs", min=1, help="distinct test MRs to generate for (evenly spread); "
        "default: the run's eval.max_mrs (null = all)")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="greedy decoding, not beams")] = False,
    num_beams: Annotated[int | None, typer.Option(
        "--num-beams", min=1, help="beam width; default: the run's eval.num_beams")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", min=1, help="prompts per batch; default: the run's eval.batch_size")
    ] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="cpu, cuda or auto; default: the run's train.device")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="hide progress bars")] = False,
    untuned: Annotated[bool, typer.Option(
        "--untuned", help="also score the base model without the adapter, side by side")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log more")] = False,
) -> None:
    """Generate for the test MRs, score BLEU/NIST/METEOR/ROUGE-L/CIDEr and perplexity;
    writes predictions.txt, references.txt and scores.json into the run folder."""
    _logging(verbose)
    from hsplitlora.eval.evaluate import RunDirError, check_run_dir, evaluate_run
    from hsplitlora.eval.generate import GenerationSettings

    try:
        check_run_dir(run_dir)
        cfg = load_config(run_dir / "config.yaml")
    except (RunDirError, ConfigError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    beams = 1 if greedy else (num_beams or cfg.eval.num_beams)
    try:
        result = evaluate_run(run_dir, max_mrs=max_mrs,
                              settings=GenerationSettings(num_beams=beams),
                              batch_size=batch_size, device=device,
                              show_progress=not no_progress, untuned=untuned)
    except RunDirError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    table = Table(title=f"{cfg.train.mode} on {cfg.model.name}: {result['num_mrs']} test MRs, "
                  + ("greedy" if beams == 1 else f"beam {beams}"))
    table.add_column("metric")
    base = result.get("untuned")
    if base is not None:
        table.add_column("untuned", justify="right")
    table.add_column("fine-tuned" if base is not None else "value", justify="right")
    for key in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "eval_loss", "eval_ppl"):
        before = [_fmt(base.get(key))] if base is not None else []
        table.add_row(key, *before, _fmt(result[key]))
    console.print(table)
    for name, why in result["unavailable"].items():
        console.print(f"[yellow]{name} unavailable:[/yellow] {why}")
    console.print(f"wrote predictions.txt, references.txt, scores.json in {run_dir}")


@app.command()
def experiment(
    file: Annotated[Path, typer.Argument(help="experiment YAML (base, grid, evaluate, output)")],
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="list the runs and which are done; train nothing")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="hide progress bars")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log more")] = False,
) -> None:
    """Run a grid of runs (modes x ranks x cuts x seeds); finished runs are skipped, so
    re-running resumes. Writes summary.md, summary.csv and plots into the grid folder."""
    _logging(verbose)
    from hsplitlora.experiment import PlannedRun, load_experiment, run_experiment
    from hsplitlora.train.run import checkpoint_path

    try:
        exp = load_experiment(file)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if dry_run:
        plan = Table(title=f"{len(exp.runs)} runs in {exp.output}")
        plan.add_column("run")
        plan.add_column("status")
        for run in exp.runs:
            folder = exp.output / run.name
            status = ("trained" if (folder / "summary.json").is_file()
                      else "interrupted, resumes" if checkpoint_path(folder).is_file()
                      else "interrupted, restarts" if folder.exists() else "to do")
            if status == "trained" and (folder / "scores.json").is_file():
                status = "trained, scored"
            plan.add_row(run.name, status)
        console.print(plan)
        return

    def report(index: int, run: PlannedRun, status: str) -> None:
        console.print(f"[bold][{index + 1}/{len(exp.runs)}][/bold] {run.name}: {status}")

    try:
        rows = run_experiment(exp, show_progress=not no_progress, on_run=report)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    table = Table(title=f"{exp.source.name}: {len(rows)} runs", box=box.SIMPLE_HEAD)
    columns = {"mode": "mode", "rank": "r", "cut": "cut", "eval_ppl": "ppl", "BLEU": "BLEU",
               "NIST": "NIST", "METEOR": "METEOR", "ROUGE_L": "ROUGE_L", "CIDEr": "CIDEr"}
    for key, header in columns.items():
        table.add_column(header, justify="left" if key == "mode" else "right")
    for row in rows:
        table.add_row(*("-" if row[k] is None else f"{row[k]:.4g}" if isinstance(row[k], float)
                        else str(row[k]) for k in columns))
    console.print(table)
    console.print(f"summary: {exp.output / 'summary.md'}")


@app.command()
def plan(
    config: Path = typer.Option(None, "--config", "-c", help="YAML run configuration"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set train.num_clients=8"),
    meta: bool = typer.Option(False, "--meta", help="plan from the model's config.json alone "
                              "(built on the meta device: no weights, no data, no probing), "
                              "for sequences of data.max_length tokens"),
) -> None:
    """Print each client's plan (cut, ranks, memory / budget, step and round time) and the
    main server's load, without training."""
    _logging(False)
    cfg = _config(config, set_)
    from hsplitlora.hetero.planner import PlanError, format_plan_table
    from hsplitlora.hetero.scheme import plan_run

    try:
        result, dims = plan_run(cfg, meta=meta)
    except PlanError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    # Without a terminal rich assumes 80 columns; the table needs more.
    out = console if console.is_terminal else Console(width=200)
    out.print(format_plan_table(result, dims))


from hsplitlora.transport.cli import register  # noqa: E402

register(app)

if __name__ == "__main__":
    app()
