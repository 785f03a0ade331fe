"""Command line: ``hsplitlora train --config FILE`` and friends.

A person's mistake (a bad config, data file, model, cut, target, device, run folder) is
printed as its message with exit code 2, never as a traceback: every such error derives
from :class:`hsplitlora.errors.UserError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hsplitlora.config import RunConfig, load_config
from hsplitlora.config_doc import describe_fields
from hsplitlora.terminal import check_run_folder, console, error_exit, setup_logging, user_errors
from hsplitlora.transport.cli import register

app = typer.Typer(no_args_is_help=True,
                  help="Split federated LoRA fine-tuning (SplitLoRA, HSplitLoRA).")
def _config(path: Path | None, overrides: list[str]) -> RunConfig:
    """The validated config, or the validation message and exit code 2."""
    with user_errors():
        return load_config(path, overrides)


def _version(value: bool) -> None:
    if value:
        try:
            console.print(f"hsplitlora {version('hsplitlora')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            console.print("hsplitlora (not installed; source tree)")
        raise typer.Exit()


@app.callback()
def main(
    version_: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
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
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the run already in "
                                   "the run folder (without it, an existing run is refused)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bar"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log transformers' info too"),
) -> None:
    """Train one run (mode, model, data from the config); writes a run folder."""
    setup_logging(verbose)
    cfg = _config(config, [*set_, *([f"train.backend={backend}"] if backend else [])])
    from hsplitlora.checkpoint import CheckpointError
    from hsplitlora.train.run import run_path
    from hsplitlora.train.run import train as run_training

    with user_errors():
        check_run_folder(run_path(cfg), resume=resume, overwrite=overwrite)
        try:
            result = run_training(cfg, show_progress=not no_progress,
                                  checkpoint=checkpoint or resume, resume=resume)
        except (FileNotFoundError, CheckpointError) as e:  # --resume: none, or damaged
            raise error_exit(e) from None
    s = result.summary
    table = Table(title=f"{s['mode']} on {s['model']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("clients", "cut", "rank", "steps", "first_loss", "final_loss", "eval_loss",
                "eval_ppl", "seconds_per_step", "bytes_up", "bytes_down",
                "client_trainable_params"):
        if key in s:
            v = s[key]
            if v is None and "plans" in s:  # a planned run: a cut and ranks per client
                v = "per client (below)"
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    if "plans" in s:
        console.print("plans that ran last (cut, client-side adapters): " + ", ".join(
            f"client {i}: cut {p['cut']}, {p['client_adapters']}"
            for i, p in enumerate(s["plans"])))
    for when in ("before", "after"):
        if when in result.samples:
            console.print(f"[bold]{when} fine-tuning:[/bold] {escape(result.samples[when])}")
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
    setup_logging(verbose)
    from hsplitlora.eval.evaluate import check_run_dir, evaluate_run
    from hsplitlora.eval.generate import GenerationSettings

    with user_errors():
        check_run_dir(run_dir)
        cfg = load_config(run_dir / "config.yaml")
        beams = 1 if greedy else (num_beams or cfg.eval.num_beams)
        result = evaluate_run(run_dir, max_mrs=max_mrs,
                              settings=GenerationSettings(num_beams=beams),
                              batch_size=batch_size, device=device,
                              show_progress=not no_progress, untuned=untuned)
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
    summary_only: Annotated[bool, typer.Option(
        "--summary-only", help="write summary.md, summary.csv and the plots from the runs "
        "that finished; train and score nothing (a grid still running elsewhere, or "
        "stopped part way)")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="hide progress bars")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log more")] = False,
) -> None:
    """Run a grid of runs (modes x ranks x cuts x seeds); finished runs are skipped, so
    re-running resumes. Writes summary.md, summary.csv and plots into the grid folder."""
    setup_logging(verbose)
    from hsplitlora.experiment import (
        PlannedRun,
        collect_rows,
        load_experiment,
        run_experiment,
        write_summary,
    )
    from hsplitlora.train.run import checkpoint_path

    with user_errors():
        exp = load_experiment(file)
    if summary_only:
        rows = collect_rows(exp)
        write_summary(exp, rows)
        console.print(f"{len(rows)} of {len(exp.runs)} runs finished; summary: "
                      f"{exp.output / 'summary.md'}")
        return
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

    with user_errors():
        rows = run_experiment(exp, show_progress=not no_progress, on_run=report)
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
    probe: bool = typer.Option(False, "--probe", help="measure importance first (split "
                               "probing on each client's shard, as training does; minutes "
                               "on SmolLM2); default: every matrix equally important"),
    meta: bool = typer.Option(False, "--meta", help="plan from the model's config.json alone "
                              "(built on the meta device: no weights, no data, no probing), "
                              "for sequences of data.max_length tokens"),
) -> None:
    """Print each client's plan (cut, ranks, memory / budget, step and round time) and the
    main server's load from the cost model, without training; in seconds unless --probe
    measures importance."""
    setup_logging(False)
    cfg = _config(config, set_)
    from hsplitlora.hetero.armsc import format_plan_table
    from hsplitlora.plan import plan_run

    with user_errors():
        result, dims = plan_run(cfg, probe=probe, meta=meta)
    # Without a terminal rich assumes 80 columns; the table needs more.
    out = console if console.is_terminal else Console(width=200)
    out.print(format_plan_table(result, dims))
    if not probe and cfg.mode.importance and cfg.hetero.importance:
        console.print("importance not measured (every matrix weighs the same); "
                      "--probe measures it as training will")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run folder written by train or serve")],
    merged: Annotated[Path | None, typer.Option(
        "--merged", help="write the fine-tuned model, adapters merged in, with its tokenizer "
        "here (AutoModelForCausalLM.from_pretrained loads it)")] = None,
    client_adapter: Annotated[Path | None, typer.Option(
        "--client-adapter", help="a serve run with a separate fed server: the fed server's "
        "client_adapter.safetensors (default: <run>-fed/ beside the run); joined with the "
        "run's server half into <run>/adapter")] = None,
    dtype: Annotated[Literal["float32", "bfloat16", "float16"], typer.Option(
        "--dtype", help="weights of the merged model (the merge itself is float32)")
    ] = "float32",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace what is in the --merged folder")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log more")] = False,
) -> None:
    """Export a run: a merged standalone model (--merged), or the PEFT adapter assembled
    from a deployment's two halves."""
    setup_logging(verbose)
    from hsplitlora.export import SERVER_HALF, ExportError, assemble_adapter, export_merged

    with user_errors():
        halves = (run_dir / SERVER_HALF).is_file() and not (run_dir / "adapter").is_dir()
        if merged is None and not (halves or client_adapter):
            raise ExportError("nothing to export: pass --merged OUT for a merged model (or "
                              "--client-adapter FILE to assemble a serve run's adapter)")
        if halves or client_adapter:
            console.print(f"adapter: {assemble_adapter(run_dir, client_adapter)}")
        if merged is not None:
            out = export_merged(run_dir, merged, dtype=dtype, overwrite=overwrite)
            console.print(f"merged model: {out}")


@app.command("config")
def config_(
    section: Annotated[str | None, typer.Argument(
        help="one section (model, lora, data, train, hetero, eval, net, ray, output)")] = None,
) -> None:
    """Print every config field with its type, default and description."""
    with user_errors():
        text = describe_fields(RunConfig, section)
    typer.echo(text)


register(app)  # serve, join, fedserver

if __name__ == "__main__":
    app()
