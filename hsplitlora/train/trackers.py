"""Experiment trackers (``output.report_to``): TensorBoard, W&B, MLflow as sinks of the
recorder, fed the very records ``metrics.jsonl`` gets.

Each record becomes scalars under one naming scheme for every tracker: a training step's
``train/loss``, ``train/lr``, ``train/tokens``, ``train/bytes_up``, ``train/bytes_down``
at its global step; an event's numeric fields as ``<event>/<field>`` (``aggregate/
bytes_up``, ``eval/loss``, ``eval/ppl``) at the step it happened after; at the end the
simulated seconds per round (``sim/seconds`` by round) and the summary's numbers.
Everything local by default: TensorBoard and MLflow write into the run folder, W&B
follows ``output.wandb_mode`` (offline: ``<run folder>/wandb``, for a later sync).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from hsplitlora.train.config import OutputConfig

__all__ = ["Sink", "open_sinks", "scalars"]

log = logging.getLogger(__name__)


class Sink(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def series(self, name: str, values: list[float]) -> None: ...
    def summary(self, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


_STEP_FIELDS = ("loss", "lr", "tokens", "bytes_up", "bytes_down")
_NOT_METRICS = {"round", "wall", "step", "client"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """One metrics.jsonl record as tracker scalars (names as in the module docstring)."""
    if "event" not in record:
        return {f"train/{k}": float(record[k]) for k in _STEP_FIELDS if _number(record.get(k))}
    return {f"{record['event']}/{k}": float(v) for k, v in record.items()
            if k not in _NOT_METRICS and k != "event" and _number(v)}


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```")
        self.last = 0

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.last = step

    def series(self, name: str, values: list[float]) -> None:
        for i, value in enumerate(values):
            self.writer.add_scalar(name, value, i + 1)

    def summary(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"summary/{name}", value, self.last)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: OutputConfig, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=out.project, name=run_dir.name, dir=str(run_dir),
                              config=config, mode=out.wandb_mode,
                              settings=wandb.Settings(console="off"), reinit="finish_previous")
        # Steps of training and rounds of the simulated clock are different axes.
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")
        self.run.define_metric("sim/round")
        self.run.define_metric("sim/*", step_metric="sim/round")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({"train/step": step, **values})

    def series(self, name: str, values: list[float]) -> None:
        for i, value in enumerate(values):
            self.run.log({"sim/round": i + 1, name: value})

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, out: OutputConfig, run_dir: Path, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = out.mlflow_uri
        if uri is None:
            # MLflow 3 keeps its file store for local use behind this switch; a database
            # backend would need SQLAlchemy, a server more still.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(out.project)
        experiment = found.experiment_id if found else self.client.create_experiment(out.project)
        self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in _flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.pending: list[Any] = []

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, v, now, step) for k, v in values.items()]
        if len(self.pending) >= 200:
            self._flush()

    def series(self, name: str, values: list[float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(name, v, now, i + 1)
                         for i, v in enumerate(values)]

    def summary(self, values: dict[str, float]) -> None:
        self.scalars({f"summary/{k}": v for k, v in values.items()}, 0)

    def _flush(self) -> None:
        for i in range(0, len(self.pending), 1000):
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
        self.pending = []

    def close(self) -> None:
        self._flush()
        self.client.set_terminated(self.run_id)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_sinks(out: OutputConfig, run_dir: Path | None, config: dict[str, Any]) -> list[Sink]:
    """The trackers ``out.report_to`` names, opened for this run (none without a folder)."""
    if not out.report_to:
        return []
    if run_dir is None:
        log.warning("output.report_to is ignored for a run without a run folder")
        return []
    sinks: list[Sink] = []
    for name in out.report_to:
        if name == "tensorboard":
            sinks.append(_TensorBoard(run_dir, config))
        elif name == "wandb":
            sinks.append(_WandB(out, run_dir, config))
        else:
            sinks.append(_MLflow(out, run_dir, config))
    return sinks
