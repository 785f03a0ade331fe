"""Metrics (JSONL) and the progress bar, fed by the training modes.

One JSON object per line: training steps carry ``step, round, client, loss, tokens,
wall, bytes_up, bytes_down, lr``; aggregations carry ``event: "aggregate"`` and the
adapter bytes that moved. Appending line by line means a killed run keeps its history.

A step's figures may arrive :class:`~hsplitlora.train.placement.Deferred` (roles in other
processes answer before they finish computing): such steps wait in order and are written
when the round ends, or before any other record, so the file's order never changes.

Experiment trackers (:mod:`hsplitlora.train.trackers`) are sinks fed each record as it is
written, and the run's summary at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hsplitlora.train.placement import Deferred, settle
from hsplitlora.train.trackers import Sink, scalars

__all__ = ["Recorder", "kept_records"]

log = logging.getLogger(__name__)


class Recorder:
    """Writes metrics and drives a per-round progress bar with the running loss."""

    def __init__(self, path: Path | None, total_rounds: int, *, show_progress: bool = True,
                 description: str = "train", log_every: int = 0,
                 history: list[dict[str, Any]] | None = None,
                 sinks: Sequence[Sink] = ()) -> None:
        self.path = path
        self.sinks = list(sinks)
        self._file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        self.start = time.perf_counter()
        # A resumed run goes on from the records it kept (already in the file).
        self.records: list[dict[str, Any]] = list(history or [])
        self.step = max((r["step"] for r in self.records if "step" in r), default=0)
        self._running: float | None = None
        self._waiting: list[dict[str, Any]] = []  # steps with figures still deferred
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
            disable=not show_progress,
        )
        self._task = self._progress.add_task(description, total=total_rounds, loss="-")
        # Without a terminal (CI, a log file) the bar cannot redraw: log the loss instead.
        self.log_every = log_every or (0 if self._progress.console.is_terminal
                                       else max(total_rounds // 20, 1))
        self.total_rounds = total_rounds

    def __enter__(self) -> Recorder:
        self._progress.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if et is None:
                self._settle()
        finally:
            self._progress.stop()
            if self._file:
                self._file.close()
            for sink in self.sinks:
                sink.close()

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.start

    def _write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self.sinks:
            values = scalars(record)
            for sink in self.sinks:
                sink.scalars(values, self.step)

    def finish(self, summary: dict[str, Any]) -> None:
        """Hand the run's summary to the trackers: its numbers, and the simulated clock
        per round as a series of its own."""
        if not self.sinks:
            return
        numbers = {k: float(v) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for sink in self.sinks:
            sink.series("sim/seconds", [float(x) for x in summary.get("simulated_round_s", [])])
            sink.summary(numbers)

    def train_step(self, *, round: int, client: int | None, loss: float | Deferred,
                   tokens: int | Deferred, bytes_up: int | Deferred = 0,
                   bytes_down: int | Deferred = 0, lr: float | Deferred = 0.0) -> None:
        self._waiting.append(dict(round=round, client=client, loss=loss, tokens=tokens,
                                  bytes_up=bytes_up, bytes_down=bytes_down, lr=lr))
        if not any(isinstance(v, Deferred) for step in self._waiting for v in step.values()):
            self._settle()

    def _settle(self) -> None:
        waiting, self._waiting = self._waiting, []
        for step in waiting:
            self._step(**{k: settle(v) for k, v in step.items()})

    def _step(self, *, round: int, client: int | None, loss: float, tokens: int,
              bytes_up: int, bytes_down: int, lr: float) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at round {round} (client {client}): lower train.lr or use "
                "train.precision fp32")
        self.step += 1
        self._write({"step": self.step, "round": round, "client": client, "loss": loss,
                     "tokens": tokens, "wall": round_(self.wall), "bytes_up": bytes_up,
                     "bytes_down": bytes_down, "lr": lr})
        # Exponential moving average, so the bar shows a trend rather than batch noise.
        self._running = loss if self._running is None else 0.9 * self._running + 0.1 * loss

    def event(self, name: str, **fields: Any) -> None:
        self._settle()
        self._write({"event": name, "wall": round_(self.wall), **fields})

    def evaluate_every(self, rounds: int, evaluator: Callable[[Any], tuple[float, float]]) -> None:
        """Evaluate the global model every ``rounds`` rounds (0 = never) with
        ``evaluator(state) -> (loss, ppl)``; the final evaluation is the caller's."""
        self._eval_every, self._evaluator = rounds, evaluator

    def global_model(self, round: int, state: Callable[[], Any]) -> None:
        """Called where a global model exists (after an aggregation, a hand-off, or any
        centralized step); logs held-out loss and perplexity when one is due."""
        self._settle()
        every = getattr(self, "_eval_every", 0)
        if every and (round + 1) % every == 0 and round + 1 < self.total_rounds:
            loss, ppl = self._evaluator(state())
            self.event("eval", round=round, loss=loss, ppl=ppl)
            log.info("round %d: held-out loss %.4f, perplexity %.3f", round + 1, loss, ppl)

    def end_round(self, round: int) -> None:
        self._settle()
        loss = "-" if self._running is None else f"{self._running:.3f}"
        self._progress.update(self._task, completed=round + 1, loss=loss)
        if self.log_every and ((round + 1) % self.log_every == 0 or round == 0):
            log.info("round %d/%d  running loss %s  (%.0f s)", round + 1, self.total_rounds,
                     loss, self.wall)


def round_(x: float) -> float:
    return round(x, 4)


def kept_records(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Keep the records of rounds up to ``last_round`` (a checkpoint's) in the metrics
    file at ``path`` and drop the rest, which a resumed run writes again; returns them."""
    if not path.is_file():
        return []
    kept = []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the kill cut the last line short
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON record; the metrics file "
                             "is damaged") from None
        if record.get("round", -1) <= last_round:
            kept.append(record)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
    return kept
