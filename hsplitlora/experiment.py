"""Experiment grids: modes x ranks x cuts x seeds from one YAML, resumable, one summary.

An experiment file holds a ``base`` run config (the train-config schema, inline or a path
to a config file), a ``grid`` of values to sweep, optional named ``variants`` (bundles of
settings, such as a method with one component switched off, that the grid key ``variant``
picks), an optional ``evaluate`` section, an optional ``compare`` section (the headline
check over seeds, :mod:`hsplitlora.experiment_table`), and the ``output`` folder. Every
run gets a folder named by its grid values; a run whose folder has ``summary.json`` (and
``scores.json`` when evaluation is asked) is done and skipped; a folder without it is an
interrupted run, which goes on from its last checkpoint (runs are trained with
checkpoints) or, with none, is deleted and re-run, so an interrupted grid resumes where it
stopped. The grid folder gets ``summary.md``, ``summary.csv`` and the plots.
"""

from __future__ import annotations

import copy
import csv
import gc
import itertools
import json
import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hsplitlora.config import (
    ConfigError,
    RunConfig,
    _resolve_paths,
    format_validation_error,
    load_config,
)
from hsplitlora.errors import UserError
from hsplitlora.eval.evaluate import SCORES_FILE, evaluate_run
from hsplitlora.eval.generate import GenerationSettings
from hsplitlora.eval.metrics import METRIC_NAMES
from hsplitlora.experiment_table import LossCurve, headline, mean_spread, seed_groups, time_to_loss
from hsplitlora.modes import MODES
from hsplitlora.train.clock import PARTS
from hsplitlora.train.run import checkpoint_path, train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = [
    "GRID_KEYS",
    "EvaluateSpec",
    "Experiment",
    "PlannedRun",
    "collect_rows",
    "load_experiment",
    "run_experiment",
    "run_name",
    "write_summary",
]

log = logging.getLogger(__name__)

# Grid shorthands -> (config field, label in folder names). Any other grid key must be a
# dotted config path such as ``train.lr``.
GRID_KEYS: dict[str, tuple[str, str]] = {
    "mode": ("train.mode", "mode"),
    "rank": ("lora.r", "r"),
    "cut": ("train.cut", "cut"),
    "clients": ("train.num_clients", "clients"),
    "seed": ("train.seed", "seed"),
    "partition": ("data.partition", "part"),
}
# The grid key naming a bundle of settings from the file's ``variants``.
VARIANT = "variant"
CSV_COLUMNS = ("run", "variant", "partition", "mode", "rank", "cut", "clients", "seed",
               "eval_ppl", *METRIC_NAMES, "wall_s", "simulated_s",
               *(f"simulated_{part}_s" for part in PARTS), "client_trainable_params",
               "bytes_sent")


class EvaluateSpec(BaseModel):
    """Scoring after training; fewer MRs or beams than the paper's make CPU grids feasible."""

    model_config = ConfigDict(extra="forbid")
    max_mrs: int | None = Field(None, ge=1, description="test MRs to generate for; null = all")
    num_beams: int = Field(10, ge=1, description="beam width; 1 = greedy")
    batch_size: int | None = Field(None, ge=1, description="null = the run's eval.batch_size")

    def settings(self) -> GenerationSettings:
        return GenerationSettings(num_beams=self.num_beams)


class CompareSpec(BaseModel):
    """The headline check of a grid over seeds: does ``method`` beat every baseline?"""

    model_config = ConfigDict(extra="forbid")
    method: str = Field(description="the variant under test")
    baselines: list[str] = Field(min_length=1, description="the variants it must beat")
    time_ratio: float = Field(0.8, gt=0, description="the method must reach the best "
                              "baseline's final eval loss within this fraction of that "
                              "baseline's simulated time")


class _ExperimentFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: dict[str, Any] | Path = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    grid: dict[str, list[Any]]
    evaluate: EvaluateSpec | None = None
    compare: CompareSpec | None = None
    output: Path


@dataclass(frozen=True)
class PlannedRun:
    name: str  # folder name, from the grid values
    values: dict[str, Any]  # grid key -> value (no cut for unsplit modes)
    config: RunConfig


@dataclass(frozen=True)
class Experiment:
    source: Path
    output: Path
    runs: list[PlannedRun]
    evaluate: EvaluateSpec | None
    compare: CompareSpec | None = None


def _fail(path: Path, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise _fail(path, f"the {what} must be a YAML mapping")
    return loaded


def _config_path(key: str, source: Path) -> str:
    if key == VARIANT:
        return VARIANT
    if key in GRID_KEYS:
        return GRID_KEYS[key][0]
    if "." in key:
        return key
    raise _fail(source, f"grid key {key!r} is neither a shorthand ({', '.join(GRID_KEYS)}, "
                f"{VARIANT}) nor a dotted config path like train.lr")


def run_name(values: dict[str, Any]) -> str:
    """``mode=splitlora_r=4_cut=3_seed=42``: the variant, shorthands in a fixed order, then
    the rest."""
    first = [VARIANT, *GRID_KEYS]
    order = [k for k in first if k in values] + [k for k in values if k not in first]
    parts = [f"{GRID_KEYS[k][1] if k in GRID_KEYS else k}={values[k]}" for k in order]
    return "_".join(parts).replace("/", "-").replace(" ", "")


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _mode_of(values: dict[str, Any], variant: dict[str, Any], base: dict[str, Any]) -> Any:
    return values.get("mode", variant.get("train.mode",
                                          base.get("train", {}).get("mode", "splitlora")))


def _check_variants(spec: _ExperimentFile, path: Path) -> None:
    for name, settings in spec.variants.items():
        bad = [k for k in settings if "." not in k]
        if bad:
            raise _fail(path, f"variants.{name}: {', '.join(bad)} is not a dotted config path "
                        "(write e.g. train.mode: hsplitlora, hetero.importance: false)")
    if VARIANT in spec.grid:
        unknown = [v for v in spec.grid[VARIANT] if v not in spec.variants]
        if unknown:
            raise _fail(path, f"grid.{VARIANT} names {', '.join(map(str, unknown))}, not in "
                        f"variants ({', '.join(spec.variants) or 'none defined'})")
    elif spec.variants:
        raise _fail(path, f"variants are defined but grid has no {VARIANT} key to pick them")
    if spec.compare is not None:
        named = [spec.compare.method, *spec.compare.baselines]
        missing = [v for v in named if v not in spec.grid.get(VARIANT, [])]
        if missing:
            raise _fail(path, f"compare names {', '.join(missing)}, not in grid.{VARIANT}")


def load_experiment(path: Path) -> Experiment:
    """Read and expand an experiment file; every run's config is validated up front, so a
    typo fails in seconds rather than after the first hour of the grid."""
    path = Path(path)
    raw = _read_mapping(path, "experiment file")
    try:
        spec = _ExperimentFile.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid experiment file {path} (sections: base, grid, evaluate, "
                          "output):\n" + "\n".join(lines)) from None
    if isinstance(spec.base, Path):
        base_file = spec.base if spec.base.is_absolute() else path.parent / spec.base
        base = _read_mapping(base_file, "base config")
        _resolve_paths(base, base_file.parent)
    else:
        base = copy.deepcopy(spec.base)
        _resolve_paths(base, path.parent)
    for key, options in spec.grid.items():
        if not options:
            raise _fail(path, f"grid.{key} is empty; give at least one value")
    _check_variants(spec, path)
    paths = {key: _config_path(key, path) for key in spec.grid}

    runs: dict[str, PlannedRun] = {}
    for combo in itertools.product(*spec.grid.values()):
        values = dict(zip(spec.grid, combo, strict=True))
        variant = spec.variants.get(values.get(VARIANT), {})
        mode = MODES.get(_mode_of(values, variant, base))  # an unknown one fails below
        if mode is not None and not mode.split:  # a cut means nothing there: run once
            values.pop("cut", None)
        name = run_name(values)
        if name in runs:
            continue
        run_raw = copy.deepcopy(base)
        for key, value in variant.items():
            _set(run_raw, key, copy.deepcopy(value))
        for key, value in values.items():
            if key != VARIANT:
                _set(run_raw, paths[key], value)
        _set(run_raw, "output.dir", str(spec.output))
        _set(run_raw, "output.name", name)
        try:
            cfg = RunConfig.model_validate(run_raw)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"{path} (run {name})")) from None
        runs[name] = PlannedRun(name, values, cfg)
    return Experiment(path, spec.output, list(runs.values()), spec.evaluate, spec.compare)


# Fields that change neither training nor its numbers; a finished run is reused across them.
_COSMETIC = frozenset({"train.log_every", "train.threads", "train.device", "eval.batch_size",
                       "eval.num_beams", "eval.max_mrs"})


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """A finished folder is only reused if it was trained with this very config."""
    def settings(c: RunConfig) -> dict[str, Any]:
        return _flat(c.model_dump(mode="json", exclude={"output"}))

    saved, wanted = settings(load_config(run_dir / "config.yaml")), settings(cfg)
    diff = [k for k in wanted if k not in _COSMETIC and saved.get(k) != wanted[k]]
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted[k]!r} now" for k in diff[:4])
        raise ConfigError(f"{run_dir} was trained with a different config ({shown}); delete "
                          "that folder to re-run it, or use another output folder")


def _needs_evaluation(run_dir: Path, spec: EvaluateSpec) -> bool:
    path = run_dir / SCORES_FILE
    if not path.is_file():
        return True
    done = json.loads(path.read_text(encoding="utf-8"))
    return bool(done.get("settings") != spec.settings().as_dict()
                or done.get("max_mrs") != spec.max_mrs)


def run_experiment(
    exp: Experiment | Path,
    *,
    show_progress: bool = True,
    on_run: Callable[[int, PlannedRun, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train (and score) every run not yet done, then write the grid summary.

    ``on_run(index, run, status)`` is told ``skip``, ``train``, ``evaluate``, ``failed`` as
    the grid goes, for a CLI to report progress. Returns one row per run (see
    :func:`collect_rows`). A run its config cannot train (a plan that does not fit, say:
    a :class:`~hsplitlora.errors.UserError`) does not stop the grid: the others go on,
    the summary names it with the reason, and :class:`GridIncomplete` is raised at the end.
    """
    if not isinstance(exp, Experiment):
        exp = load_experiment(exp)
    exp.output.mkdir(parents=True, exist_ok=True)
    copy_to = exp.output / "experiment.yaml"
    if not copy_to.exists() or not copy_to.samefile(exp.source):
        shutil.copyfile(exp.source, copy_to)  # the grid folder says how it was made
    failed: dict[str, str] = {}
    for index, run in enumerate(exp.runs):
        run_dir = exp.output / run.name
        trained = (run_dir / "summary.json").is_file()
        if trained:
            _check_same_config(run_dir, run.config)
        else:
            resume = checkpoint_path(run_dir).is_file()
            if resume:
                log.warning("%s was interrupted: resuming it from its checkpoint", run_dir)
            elif run_dir.exists():
                log.warning("%s has no summary.json and no checkpoint (interrupted run): "
                            "training it afresh", run_dir)
                shutil.rmtree(run_dir)
            if on_run:
                on_run(index, run, "train")
            try:
                train(run.config, show_progress=show_progress, checkpoint=True, resume=resume)
            except UserError as e:
                log.error("%s cannot run: %s", run.name, e)
                failed[run.name] = str(e)
                if on_run:
                    on_run(index, run, "failed")
                continue
            finally:
                gc.collect()  # the run's model copies before the next one loads
        scoring = exp.evaluate is not None and _needs_evaluation(run_dir, exp.evaluate)
        if exp.evaluate is not None and scoring:
            if on_run:
                on_run(index, run, "evaluate")
            # perplexity is already in summary.json, from the same held-out sample
            evaluate_run(run_dir, max_mrs=exp.evaluate.max_mrs, settings=exp.evaluate.settings(),
                         batch_size=exp.evaluate.batch_size, show_progress=show_progress,
                         with_perplexity=False)
        if trained and not scoring:
            if on_run:
                on_run(index, run, "skip")
        else:  # tables after every new result (cheap); plots once, at the end
            write_summary(exp, collect_rows(exp), plots=False, failed=failed)
    rows = collect_rows(exp)
    write_summary(exp, rows, failed=failed)
    if failed:
        raise GridIncomplete(failed)
    return rows


class GridIncomplete(UserError):
    """Some runs of a grid could not train; every other run finished and is summarised."""

    def __init__(self, failed: Mapping[str, str]) -> None:
        self.failed = dict(failed)
        super().__init__(f"{len(failed)} run(s) could not train (the rest finished; "
                         "summary.md lists them with the reasons): "
                         + "; ".join(f"{name}: {why}" for name, why in failed.items()))


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def collect_rows(exp: Experiment) -> list[dict[str, Any]]:
    """One row per finished run, columns as :data:`CSV_COLUMNS` (metrics on the scorer's
    scales; None where a run was not scored or a value was not recorded)."""
    rows = []
    for run in exp.runs:
        run_dir = exp.output / run.name
        summary = _load_json(run_dir / "summary.json")
        if not summary:
            continue
        scores = _load_json(run_dir / SCORES_FILE)
        cfg = run.config
        row: dict[str, Any] = {
            "run": run.name,
            "variant": run.values.get(VARIANT, cfg.train.mode),
            "partition": cfg.data.partition,
            "mode": cfg.train.mode,
            "rank": cfg.lora.r,  # the grid's setting, which groups the bars
            "cut": cfg.train.cut if cfg.mode.split else None,
            # as the run had them: SplitLoRA on heterogeneous devices takes the weakest
            # client's rank; a planned run has per-client cuts and ranks (None here)
            "ran_rank": summary.get("rank", cfg.lora.r),
            "ran_cut": summary.get("cut", cfg.train.cut) if cfg.mode.split else None,
            "clients": cfg.train.num_clients,
            "seed": cfg.train.seed,
            "eval_ppl": summary.get("eval_ppl", scores.get("eval_ppl")),
            **{name: scores.get(name) for name in METRIC_NAMES},
            "wall_s": summary.get("wall_s"),
            "simulated_s": summary.get("simulated_s"),
            # runs trained before the split was recorded have none
            **{f"simulated_{part}_s": summary.get("simulated_parts", {}).get(part)
               for part in PARTS},
            "client_trainable_params": summary.get("client_trainable_params"),
            "bytes_sent": summary.get("bytes_up", 0) + summary.get("bytes_down", 0),
        }
        parts = [row[f"simulated_{part}_s"] for part in PARTS]
        row["simulated_parts"] = None if None in parts else parts
        rows.append(row)
    return rows


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@dataclass(frozen=True)
class _Curve:
    steps: list[float]  # client mini-batches processed so far (comparable across modes)
    wall: list[float]
    simulated: list[float] | None  # None when the run has no simulated clock
    ppl: list[float]


def _at_rounds(per_round: list[float] | None, rounds: list[int]) -> list[float] | None:
    """Values of a per-round series (the summary's ``simulated_round_s``) at ``rounds``."""
    if not per_round or not rounds or max(rounds) >= len(per_round):
        return None
    return [per_round[t] for t in rounds]


def _eval_curve(records: list[dict[str, Any]], sim_rounds: list[float] | None) -> _Curve:
    steps = [r for r in records if "event" not in r]
    evals = [r for r in records if r.get("event") == "eval" and "ppl" in r]
    step_at = [max((s["step"] for s in steps if s["round"] <= e["round"]), default=0)
               for e in evals]
    return _Curve([float(s) for s in step_at], [e["wall"] for e in evals],
                  _at_rounds(sim_rounds, [e["round"] for e in evals]), [e["ppl"] for e in evals])


def _train_curve(records: list[dict[str, Any]], sim_rounds: list[float] | None) -> _Curve:
    """exp(token-weighted training loss per round), smoothed over ~4% of training."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        if "event" not in r and "loss" in r:
            by_round.setdefault(r["round"], []).append(r)
    rounds = sorted(by_round)
    losses = [sum(r["loss"] * max(r["tokens"], 1) for r in by_round[t])
              / sum(max(r["tokens"], 1) for r in by_round[t]) for t in rounds]
    smooth = _moving_average(losses, max(1, len(rounds) // 25))
    return _Curve([float(max(r["step"] for r in by_round[t])) for t in rounds],
                  [max(r["wall"] for r in by_round[t]) for t in rounds],
                  _at_rounds(sim_rounds, rounds),
                  [math.exp(min(loss, 50.0)) for loss in smooth])


def _label(row: dict[str, Any], seeds: int) -> str:
    rank, cut = row.get("ran_rank", row["rank"]), row.get("ran_cut", row["cut"])
    label = row["mode"] + (" (planned)" if rank is None else f" r={rank}")
    if cut is not None:
        label += f" cut={cut}"
    return label + (f" s={row['seed']}" if seeds > 1 else "")


def _colors(rows: list[dict[str, Any]]) -> list[Any]:
    """One colour family per mode, darker for higher ranks."""
    out = []
    for row in rows:
        same = sorted({(r["rank"], r["cut"] or 0) for r in rows if r["mode"] == row["mode"]})
        shade = 0.45 + 0.5 * same.index((row["rank"], row["cut"] or 0)) / max(len(same) - 1, 1)
        out.append(plt.get_cmap(_color(row["mode"]))(shade))
    return out


def _color(mode: str) -> str:
    """The matplotlib colormap of a mode's bars and curves."""
    return MODES[mode].color if mode in MODES else "Greys"


def _plot_curves(exp: Experiment, rows: list[dict[str, Any]]) -> list[Path]:
    records = {row["run"]: _records(exp.output / row["run"]) for row in rows}
    use_eval = all(sum(r.get("event") == "eval" for r in recs) >= 2 for recs in records.values())
    sim_rounds = {row["run"]: _load_json(exp.output / row["run"] / "summary.json").get(
        "simulated_round_s") for row in rows}
    curves = {name: (_eval_curve if use_eval else _train_curve)(recs, sim_rounds[name])
              for name, recs in records.items()}
    ylabel = "held-out perplexity" if use_eval else "training perplexity"
    title = exp.source.stem + (": held-out perplexity during training" if use_eval else
                               ": exp(training loss), moving average over ~4% of training")
    seeds = len({row["seed"] for row in rows})
    axes: list[tuple[str, str, Callable[[_Curve], list[float] | None]]] = [
        ("steps", "client mini-batches processed (all clients)", lambda c: c.steps),
        ("wall", "wall-clock time (s), this machine, clients run one after another",
         lambda c: c.wall),
        ("simulated", "simulated time (s) on the configured device profiles",
         lambda c: c.simulated),
    ]
    written = []
    for key, xlabel, pick in axes:
        xs = [pick(curves[row["run"]]) for row in rows]
        if any(x is None for x in xs):
            log.info("not every run recorded %s time: skipping ppl_vs_%s", key, key)
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for row, x, color in zip(rows, xs, _colors(rows), strict=True):
            ax.plot(x or [], curves[row["run"]].ppl, color=color, lw=1.4,
                    label=_label(row, seeds))
        ax.set_yscale("log")
        written.append(_save_curves(fig, ax, xlabel, ylabel, title,
                                    exp.output / f"ppl_vs_{key}.png"))
    return written


def _save_curves(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Label, grid and save a figure of curves; the file written."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_metrics(exp: Experiment, rows: list[dict[str, Any]]) -> Path | None:
    """One panel per metric; bars grouped by rank (and seed), one bar per mode in a group,
    as the papers' tables read. Values are printed on the bars because the axes are zoomed."""
    scored = [row for row in rows if row["BLEU"] is not None]
    if not scored:
        return None
    names = [m for m in METRIC_NAMES if any(row[m] is not None for row in scored)]
    seeds = len({row["seed"] for row in scored}) > 1
    groups = sorted({(row["rank"], row["seed"]) for row in scored})
    series = sorted({(row["mode"], row["cut"]) for row in scored},
                    key=lambda mc: [r["mode"] for r in scored].index(mc[0]))
    width = 0.8 / len(series)
    fig, axs = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.8), squeeze=False)
    for ax, metric in zip(axs[0], names, strict=True):
        values = []
        for k, (mode, cut) in enumerate(series):
            by_group = {(r["rank"], r["seed"]): r[metric] for r in scored
                        if (r["mode"], r["cut"]) == (mode, cut) and r[metric] is not None}
            xs = [g + k * width - 0.4 + width / 2 for g, key in enumerate(groups)
                  if key in by_group]
            ys = [by_group[key] for key in groups if key in by_group]
            values += ys
            color = plt.get_cmap(_color(mode))(0.65)
            bars = ax.bar(xs, ys, width, color=color,
                          label=mode + (f" cut={cut}" if cut is not None else ""))
            ax.bar_label(bars, fmt="%.4g", fontsize=5, rotation=90, padding=1)
        ax.set_xticks(range(len(groups)),
                      [f"r={r}" + (f" s={s}" if seeds else "") for r, s in groups], fontsize=7)
        low, high = min(values), max(values)
        ax.set_ylim(max(0.0, low - 0.6 * (high - low + 1e-9) - 0.02 * high), high * 1.06)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axs[0][0].legend(fontsize=6)
    fig.suptitle(f"{exp.source.stem}: E2E test metrics (scorer scales; y axes do not start "
                 "at 0)", fontsize=9)
    fig.tight_layout()
    path = exp.output / "metrics.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(value: Any, kind: str = "") -> str:
    if value is None or value == "":
        return "-"
    if kind == "pct":
        return f"{100 * value:.2f}"
    if kind == "bytes":
        return f"{value / 2**20:.1f}"
    if kind == "count":
        return f"{value / 1e6:.3f}M"
    if kind == "time":
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    if kind == "parts":  # a row's split of its simulated seconds
        return " / ".join(_fmt(v, "time") for v in value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


_MD_COLUMNS = [  # header, row key, format
    ("variant", "variant", ""), ("partition", "partition", ""), ("mode", "mode", ""),
    # as the run had them: "-" for a planned run (per-client cuts and ranks)
    ("rank", "ran_rank", ""), ("cut", "ran_cut", ""), ("clients", "clients", ""),
    ("seed", "seed", ""), ("ppl", "eval_ppl", ""), ("BLEU (%)", "BLEU", "pct"),
    ("NIST", "NIST", ""), ("METEOR", "METEOR", ""), ("ROUGE-L (%)", "ROUGE_L", "pct"),
    ("CIDEr", "CIDEr", ""), ("wall (s)", "wall_s", "time"),
    ("simulated (s)", "simulated_s", "time"),
    ("of which steps / agg. / probing (s)", "simulated_parts", "parts"),
    ("client params", "client_trainable_params", "count"), ("sent (MiB)", "bytes_sent", "bytes"),
]


def loss_curve(run_dir: Path) -> LossCurve | None:
    """The run's held-out loss at each evaluation against simulated seconds (the last
    evaluation of a round counts); ``None`` without eval events or a simulated clock."""
    sim = _load_json(run_dir / "summary.json").get("simulated_round_s")
    by_round = {r["round"]: r["loss"] for r in _records(run_dir)
                if r.get("event") == "eval" and "loss" in r}
    if not sim or not by_round or max(by_round) >= len(sim):
        return None
    rounds = sorted(by_round)
    return LossCurve([sim[t] for t in rounds], [by_round[t] for t in rounds])


def _setting_keys(exp: Experiment) -> list[str]:
    """The grid keys that name a setting: all but the seed."""
    keys = [k for k in (exp.runs[0].values if exp.runs else {}) if k != "seed"]
    return keys or ["mode"]


def _pm(mean: float | None, spread: float | None, kind: str = "") -> str:
    if mean is None:
        return "-"
    return _fmt(mean, kind) + ("" if spread is None else f" ± {_fmt(spread, kind)}")


_SEED_COLUMNS = [("ppl", "eval_ppl", ""), ("BLEU (%)", "BLEU", "pct"), ("NIST", "NIST", ""),
                 ("METEOR", "METEOR", ""), ("ROUGE-L (%)", "ROUGE_L", "pct"),
                 ("CIDEr", "CIDEr", ""), ("sim. s to target", "to_target", "time"),
                 ("simulated (s)", "simulated_s", "time"),
                 ("client params", "client_trainable_params", "count"),
                 ("MiB per client", "bytes_per_client", "bytes")]


def _seed_table(exp: Experiment, rows: list[dict[str, Any]],
                curves: dict[str, LossCurve | None]) -> list[str]:
    """Mean ± spread over seeds per setting, the common-target times, and the headline
    check (see :mod:`hsplitlora.experiment_table`); ``curves``: each run's
    :func:`loss_curve`."""
    values = {run.name: run.values for run in exp.runs}
    keys = _setting_keys(exp)
    enriched = [{**row, **{k: values[row["run"]].get(k, row.get(k)) for k in keys},
                 "bytes_per_client": row["bytes_sent"] / max(row["clients"], 1)}
                for row in rows]
    targets: dict[str, float] = {}  # per partition: the worst setting's mean final loss
    for partition in dict.fromkeys(r["partition"] for r in enriched):
        same = [r for r in enriched if r["partition"] == partition]
        finals = [mean_spread(curves[r["run"]].final for r in grp
                              if curves[r["run"]] is not None)[0]
                  for grp in seed_groups(same, keys).values()]
        finals = [f for f in finals if f is not None]
        if finals:
            targets[partition] = max(finals)
    for row in enriched:
        curve, target = curves[row["run"]], targets.get(row["partition"])
        row["to_target"] = (time_to_loss(curve, target)
                            if curve is not None and target is not None else None)
    lines = ["", "## Over seeds", "",
             "Mean ± sample standard deviation over the seeds that finished (n). "
             "sim. s to target: simulated seconds until the held-out loss first reaches the "
             "partition's common target, the worst final eval loss of any setting there "
             f"({', '.join(f'{p}: {t:.4f}' for p, t in targets.items()) or 'none yet'}); "
             "linear between evaluations.", "",
             "| " + " | ".join([*keys, "n", *(h for h, _, _ in _SEED_COLUMNS)]) + " |",
             "|" + "---|" * (len(keys) + 1 + len(_SEED_COLUMNS))]
    for key, group in seed_groups(enriched, keys).items():
        cells = [str(v) for v in key] + [str(len(group))]
        for _, col, kind in _SEED_COLUMNS:
            mean, spread, count = mean_spread(r[col] for r in group)
            missing = col == "to_target" and 0 < count < len(group)
            cells.append(_pm(mean, spread, kind) + (f" ({count} of {len(group)} reached)"
                                                    if missing else ""))
        lines.append("| " + " | ".join(cells) + " |")
    if exp.compare is not None:
        lines += ["", f"### Headline check: {exp.compare.method} against "
                  f"{', '.join(exp.compare.baselines)}", ""]
        for partition in dict.fromkeys(r["partition"] for r in enriched):
            runs = {v: [(r["eval_ppl"], curves[r["run"]]) for r in enriched
                        if r["partition"] == partition and r.get("variant") == v
                        and r["eval_ppl"] is not None]
                    for v in [exp.compare.method, *exp.compare.baselines]}
            verdict = headline(partition, exp.compare.method, exp.compare.baselines, runs,
                               exp.compare.time_ratio)
            lines.append("- " + (verdict.line(exp.compare.time_ratio) if verdict else
                                 f"**{partition}**: not every compared variant has finished."))
    return lines


def _plot_loss_vs_simulated(exp: Experiment, rows: list[dict[str, Any]],
                            curves: dict[str, LossCurve | None]) -> list[Path]:
    """Per partition: held-out loss against simulated time, one colour per setting, one
    line per seed."""
    written = []
    keys = _setting_keys(exp)
    values = {run.name: run.values for run in exp.runs}
    for partition in dict.fromkeys(r["partition"] for r in rows):
        mine = [r for r in rows if r["partition"] == partition]
        if not any(c is not None and len(c.seconds) > 1
                   for c in (curves[r["run"]] for r in mine)):
            continue
        settings = list(seed_groups([{**r, **values[r["run"]]} for r in mine], keys))
        cmap = plt.get_cmap("tab10")
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        labelled: set[tuple[Any, ...]] = set()
        for r in mine:
            curve = curves[r["run"]]
            if curve is None:
                continue
            setting = tuple(values[r["run"]].get(k, r.get(k)) for k in keys)
            label = " ".join(str(v) for v, k in zip(setting, keys, strict=True)
                             if k not in ("partition", "data.partition"))
            ax.plot(curve.seconds, curve.loss, color=cmap(settings.index(setting) % 10),
                    lw=1.2, marker=".", label=None if setting in labelled else label)
            labelled.add(setting)
        written.append(_save_curves(
            fig, ax, "simulated time (s) on the configured device profiles", "held-out loss",
            f"{exp.source.stem}, {partition}: eval loss against simulated time (one line "
            "per seed)", exp.output / f"loss_vs_simulated_{partition}.png"))
    return written


def write_summary(exp: Experiment, rows: list[dict[str, Any]], *, plots: bool = True,
                  failed: Mapping[str, str] | None = None) -> list[Path]:
    """``summary.csv`` (raw numbers), ``summary.md`` (a readable table with how it was made,
    and the runs that ``failed`` with why) and, with ``plots``, the figures, all in the
    grid folder. Returns the files written."""
    exp.output.mkdir(parents=True, exist_ok=True)
    csv_path = exp.output / "summary.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
    written = [csv_path]
    curves = {row["run"]: loss_curve(exp.output / row["run"]) for row in rows}
    if rows and plots:
        written += _plot_curves(exp, rows)
        metrics = _plot_metrics(exp, rows)
        if metrics:
            written.append(metrics)
        written += _plot_loss_vs_simulated(exp, rows, curves)

    lines = [f"# {exp.source.stem}", "",
             f"Made by `hsplitlora experiment {exp.source}`; {len(rows)} of {len(exp.runs)} "
             "runs finished.", ""]
    if exp.runs:
        cfg = exp.runs[0].config
        lines.append(f"Model `{cfg.model.name}`, train files "
                     f"{', '.join(Path(p).name for p in cfg.data.train_files)}, "
                     f"eval file {Path(cfg.data.eval_file).name if cfg.data.eval_file else '-'}.")
    if exp.evaluate is not None:
        decoding = ("greedy" if exp.evaluate.num_beams == 1 else
                    f"beam {exp.evaluate.num_beams}, length penalty 0.8, no-repeat-ngram 4")
        lines.append(f"Scored on {exp.evaluate.max_mrs or 'all'} test MRs ({decoding}).")
    lines += ["", "| " + " | ".join(h for h, _, _ in _MD_COLUMNS) + " |",
              "|" + "---|" * len(_MD_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[k], kind) for _, k, kind in _MD_COLUMNS) + " |")
    lines += ["", "ppl: held-out perplexity at the end of training. BLEU and ROUGE-L are shown "
              "in percent as in the papers' tables (summary.csv keeps the scorer's 0-1 scale). "
              "client params: trainable LoRA parameters on one client (all of them for "
              "centralized and federated). sent: activations, gradients and adapters, up and "
              "down, over the whole run."]
    if rows and all(row["simulated_s"] is None for row in rows):
        lines.append("No simulated clock was recorded, so there is no simulated-time column "
                     "value or plot.")
    if rows and (len({row["seed"] for row in rows}) > 1 or exp.compare is not None):
        lines += _seed_table(exp, rows, curves)
    if failed:
        lines += ["", "## Runs that could not train", "",
                  *[f"- `{name}`: {why}" for name, why in failed.items()]]
    figures = sorted(exp.output.glob("*.png"))
    lines += ["", *[f"![{p.stem}]({p.name})" for p in figures]]
    md_path = exp.output / "summary.md"
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [*written, md_path]
