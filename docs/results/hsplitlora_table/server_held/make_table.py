"""The headline over seeds after the shared server side stopped aggregating the blocks
behind every cut (README.md here).

Rows: each variant over the seeds it has, from the folder that holds its current runs:
this one for the variants the change touches (hsplitlora, no_iwi, no_armsc; no_naa_shared,
HSplitLoRA with zero-padding on its shared server side), the grid one folder up for the
rest (the baselines, and no_naa, which keeps one server-side copy per client), and the
capacity check (../capacity). The verdict is the grid's own check (hsplitlora against
the issue's baselines, seeds that both have), then the races against the capacity runs,
seed by seed. Prints markdown:

    PYTHONPATH=. python docs/results/hsplitlora_table/server_held/make_table.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from hsplitlora.experiment_table import headline

HERE = Path(__file__).parent
TABLE = HERE.parent
sys.path.insert(0, str(TABLE / "current_planner"))
from make_table import _curves, _have, _line, _race  # noqa: E402  (the re-check's helpers)

CHANGED = ("hsplitlora", "no_iwi", "no_armsc", "no_naa_shared")
BASELINES = ("splitlora", "hetlora", "flexlora", "flora")
CAPACITY = ("splitlora_all", "splitlora_all_cut1")


def _seeds(where: Path, variant: str, part: str) -> list[int]:
    return sorted(int(m.group(1)) for p in where.glob(f"variant={variant}_seed=*_part={part}")
                  if (m := re.search(r"seed=(\d+)", p.name)) and (p / "scores.json").is_file())


def _runs(where: Path, variant: str, seeds: list[int], part: str) -> list[Path]:
    return [where / f"variant={variant}_seed={s}_part={part}" for s in seeds]


def _home(variant: str) -> Path:
    if variant in CHANGED:
        return HERE
    return TABLE / "capacity" if variant in CAPACITY else TABLE


def main() -> None:
    for part in ("iid", "dirichlet"):
        print(f"\n### {part}\n")
        print("| variant | seeds | ppl | BLEU (%) | NIST | METEOR | ROUGE-L (%) | CIDEr "
              "| simulated (s) | client params | sent (MiB) |")
        print("|---" * 11 + "|")
        for v in (*CHANGED[:3], "no_naa", CHANGED[3], *BASELINES, *CAPACITY):
            seeds = _seeds(_home(v), v, part)
            if seeds:
                print(_line(v, ", ".join(map(str, seeds)), _runs(_home(v), v, seeds, part)))
        seeds = sorted(set(_seeds(HERE, "hsplitlora", part)).intersection(
            *(_seeds(TABLE, b, part) for b in BASELINES)))
        runs = {"hsplitlora": _curves(_runs(HERE, "hsplitlora", seeds, part))}
        runs |= {b: _curves(_runs(TABLE, b, seeds, part)) for b in BASELINES}
        verdict = headline(part, "hsplitlora", BASELINES, runs, 0.8)
        assert verdict is not None
        print(f"\nseeds {', '.join(map(str, seeds))}: " + verdict.line(0.8))
        for v in CAPACITY:
            both = sorted(set(_seeds(HERE, "hsplitlora", part)) & set(_seeds(_home(v), v, part)))
            if both and _have(_runs(_home(v), v, both, part)):
                print(f"\n{v}, seeds {', '.join(map(str, both))}: " + _race(
                    _runs(HERE, "hsplitlora", both, part), _runs(_home(v), v, both, part), v))


if __name__ == "__main__":
    main()
