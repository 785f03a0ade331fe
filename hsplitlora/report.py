"""Plots of a run's metrics (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_loss"]


def plot_loss(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Training loss per round (token-weighted mean over clients), with each client faint.

    Aggregation rounds are marked, since that is where a federated curve can jump.
    """
    steps = [r for r in records if "loss" in r and "event" not in r]
    by_round: dict[int, list[tuple[float, int]]] = defaultdict(list)
    by_client: dict[Any, list[tuple[int, float]]] = defaultdict(list)
    for r in steps:
        by_round[r["round"]].append((r["loss"], max(r["tokens"], 1)))
        by_client[r["client"]].append((r["round"], r["loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(by_client) > 1:
        for client, pts in sorted(by_client.items(), key=lambda kv: str(kv[0])):
            ax.plot(*zip(*pts, strict=True), lw=0.6, alpha=0.35, label=f"client {client}")
    rounds = sorted(by_round)
    mean = [sum(loss * n for loss, n in by_round[t]) / sum(n for _, n in by_round[t])
            for t in rounds]
    ax.plot(rounds, mean, color="black", lw=1.6, label="mean")
    for r in records:
        if r.get("event") == "aggregate" and r.get("side", "client") == "client":
            ax.axvline(r["round"], color="tab:gray", lw=0.4, alpha=0.3)
    ax.set_xlabel("round (local step)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
