"""A grid's results over seeds: mean and spread per setting, time to a target loss, and the
headline check of one method against its baselines.

A paper's comparison is a claim about methods, not about one seed, so the grid's
``summary.md`` gets a second table: one row per setting (every grid value except the seed),
each number the mean over seeds with the sample standard deviation beside it. Speed is
compared the way a user feels it: the simulated time a run needs to reach a held-out loss.
The *common target* of a partition is the worst final eval loss any of its settings ends
at (the mean over seeds), so every setting reaches it and the times are comparable. The
*headline check* (``compare`` in the experiment file) asks what the HSplitLoRA paper
claims: the method ends with a lower perplexity than every baseline, and reaches the best
baseline's final eval loss within ``time_ratio`` of that baseline's simulated time.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LossCurve",
    "Verdict",
    "headline",
    "mean_spread",
    "seed_groups",
    "time_to_loss",
]


@dataclass(frozen=True)
class LossCurve:
    """Held-out loss against simulated seconds, from a run's eval events."""

    seconds: list[float]
    loss: list[float]

    @property
    def final(self) -> float:
        return self.loss[-1]


def time_to_loss(curve: LossCurve, target: float) -> float | None:
    """Simulated seconds at which the held-out loss first reaches ``target``, linear
    between evaluations (the curve is only known there); ``None`` if it never does. A
    curve already below the target at its first point reaches it there: without an
    evaluation at time 0 nothing earlier can be claimed."""
    for i, (t, loss) in enumerate(zip(curve.seconds, curve.loss, strict=True)):
        if loss <= target:
            if i == 0:
                return t
            t0, l0 = curve.seconds[i - 1], curve.loss[i - 1]
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
    return None


def mean_spread(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (``None`` with one value) and count of the values
    that exist."""
    have = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not have:
        return None, None, 0
    spread = statistics.stdev(have) if len(have) > 1 else None
    return statistics.fmean(have), spread, len(have)


def seed_groups(rows: Sequence[dict[str, Any]], key: Sequence[str]
                ) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Rows grouped by ``key`` columns (every grid value but the seed), in first-seen order."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in key), []).append(row)
    return groups


@dataclass(frozen=True)
class Verdict:
    """The headline check in one partition, on means over seeds."""

    partition: str
    method_ppl: float
    best_ppl_baseline: str
    best_ppl: float
    lowest_ppl: bool  # the method's perplexity is below every baseline's
    margin_beats_spread: bool  # ... by more than the larger of the two spreads
    best_loss_baseline: str  # the baseline with the lowest final eval loss
    target_loss: float
    method_time: float | None  # method's simulated s to reach that loss (None: never)
    baseline_time: float  # that baseline's whole simulated run
    time_ratio: float | None
    fast_enough: bool

    def line(self, wanted_ratio: float) -> str:
        ratio = "never" if self.time_ratio is None else f"{self.time_ratio:.2f}x"
        return (f"**{self.partition}**: perplexity {self.method_ppl:.3f} vs best baseline "
                f"{self.best_ppl_baseline} {self.best_ppl:.3f} "
                f"({'lower' if self.lowest_ppl else 'NOT lower'}"
                f"{', margin above the seed spread' if self.margin_beats_spread else ''}); "
                f"reaches {self.best_loss_baseline}'s final eval loss {self.target_loss:.4f} "
                f"in {ratio} of its simulated time (target <= {wanted_ratio:g}x: "
                f"{'met' if self.fast_enough else 'NOT met'}).")


def headline(partition: str, method: str, baselines: Sequence[str],
             runs: dict[str, list[tuple[float, LossCurve | None]]], time_ratio: float
             ) -> Verdict | None:
    """The check on one partition. ``runs`` maps a variant to its seeds' (final
    perplexity, eval-loss curve); ``None`` when the method or no baseline has finished."""
    done = {v: r for v, r in runs.items() if r}
    have = [b for b in baselines if b in done]
    if method not in done or not have:
        return None

    def ppl(v: str) -> tuple[float, float]:
        mean, spread, _ = mean_spread(p for p, _ in done[v])
        assert mean is not None
        return mean, spread or 0.0

    def final_loss(v: str) -> float:
        mean, _, _ = mean_spread(c.final for _, c in done[v] if c is not None)
        return math.inf if mean is None else mean

    method_ppl, method_spread = ppl(method)
    best = min(have, key=lambda b: ppl(b)[0])
    best_ppl, best_spread = ppl(best)
    fastest = min(have, key=final_loss)
    target = final_loss(fastest)
    times = [time_to_loss(c, target) for _, c in done[method] if c is not None]
    method_time = (None if not times or any(t is None for t in times)
                   else statistics.fmean(t for t in times if t is not None))
    base_time = statistics.fmean(c.seconds[-1] for _, c in done[fastest] if c is not None)
    ratio = None if method_time is None or base_time <= 0 else method_time / base_time
    return Verdict(
        partition=partition, method_ppl=method_ppl, best_ppl_baseline=best, best_ppl=best_ppl,
        lowest_ppl=method_ppl < best_ppl,
        margin_beats_spread=best_ppl - method_ppl > max(method_spread, best_spread),
        best_loss_baseline=fastest, target_loss=target, method_time=method_time,
        baseline_time=base_time, time_ratio=ratio,
        fast_enough=ratio is not None and ratio <= time_ratio)
