"""The re-check of the headline grid on the current planner (README.md here).

The 48-run table one folder up was planned before ARMSC's merged downloads ran from two
starts; that change re-plans only the variants whose plans ARMSC makes with a merging
aggregator (hsplitlora, no_iwi). Their runs of the seeds in this folder were trained
again, with the same configs, into this folder; every other variant's runs are the
table's own, of the same seeds, and the capacity check's (SplitLoRA adapting all seven
matrices, ../capacity) where it has them. Runs in ../server_held (hsplitlora, no_iwi,
no_armsc), trained after the shared server side stopped aggregating the blocks behind
every cut, are shown as "server held" where they exist. This prints the comparison as
markdown, means (± sample sd) over those seeds:

    PYTHONPATH=. python docs/results/hsplitlora_table/current_planner/make_table.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hsplitlora.experiment import loss_curve
from hsplitlora.experiment_table import headline, mean_spread, time_to_loss

HERE = Path(__file__).parent
TABLE = HERE.parent
HELD = TABLE / "server_held"
REPLANNED = ("hsplitlora", "no_iwi")
BASELINES = ("splitlora", "hetlora", "flexlora", "flora")
VARIANTS = (*REPLANNED, "no_armsc", "no_naa", *BASELINES)
CAPACITY = ("splitlora_all", "splitlora_all_cut1")
METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
PERCENT = ("BLEU", "ROUGE_L")


def _seeds(part: str) -> list[int]:
    """The seeds of ``part`` that both re-planned variants have here."""
    have = [{int(m.group(1)) for p in HERE.glob(f"variant={v}_seed=*_part={part}")
             if (m := re.search(r"seed=(\d+)", p.name)) and (p / "scores.json").is_file()}
            for v in REPLANNED]
    return sorted(set.intersection(*have))


def _runs(where: Path, variant: str, seeds: list[int], part: str) -> list[Path]:
    return [where / f"variant={variant}_seed={s}_part={part}" for s in seeds]


def _cell(values: list[float], fmt: str, spread: bool = False) -> str:
    mean, sd, _ = mean_spread(values)
    assert mean is not None
    return f"{mean:{fmt}}" + (f" ± {sd:{fmt}}" if spread and sd is not None else "")


def _line(label: str, planner: str, runs: list[Path]) -> str:
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    scores = [json.loads((r / "scores.json").read_text()) for r in runs]
    cells = [label, planner, _cell([s["eval_ppl"] for s in summaries], ".3f", spread=True),
             *(_cell([(100 if m in PERCENT else 1) * s[m] for s in scores],
                     ".2f" if m in PERCENT else ".4f") for m in METRICS),
             _cell([s["simulated_s"] for s in summaries], ".2f"),
             _cell([s["client_trainable_params"] for s in summaries], ",.0f"),
             _cell([(s["bytes_up"] + s["bytes_down"]) / 2**20 for s in summaries], ".1f")]
    return "| " + " | ".join(cells) + " |"


def _have(runs: list[Path]) -> bool:
    return all((r / "scores.json").is_file() for r in runs)


def _curves(runs: list[Path]) -> list[tuple[float, object]]:
    return [(json.loads((r / "summary.json").read_text())["eval_ppl"], loss_curve(r))
            for r in runs]


def main() -> None:
    for part in ("iid", "dirichlet"):
        seeds = _seeds(part)
        if not seeds:
            continue
        print(f"\n### {part}, seed{'s' if len(seeds) > 1 else ''} "
              f"{', '.join(map(str, seeds))}\n")
        print("| variant | planner | ppl | BLEU (%) | NIST | METEOR | ROUGE-L (%) | CIDEr "
              "| simulated (s) | client params | sent (MiB) |")
        print("|---" * 11 + "|")
        for v in VARIANTS:
            if v in REPLANNED:
                print(_line(v, "before", _runs(TABLE, v, seeds, part)))
                print(_line(v, "current", _runs(HERE, v, seeds, part)))
            else:
                print(_line(v, "unchanged", _runs(TABLE, v, seeds, part)))
            if _have(_runs(HELD, v, seeds, part)):
                print(_line(v, "server held", _runs(HELD, v, seeds, part)))
        capacity = [v for v in CAPACITY if _have(_runs(TABLE / "capacity", v, seeds, part))]
        for v in capacity:
            print(_line(v, "capacity check", _runs(TABLE / "capacity", v, seeds, part)))
        held = _have(_runs(HELD, "hsplitlora", seeds, part))
        for planner, where in (("before planner", TABLE), ("current planner", HERE),
                               *([("server held", HELD)] if held else [])):
            runs = {v: _curves(_runs(where, v, seeds, part)) for v in REPLANNED}
            runs |= {b: _curves(_runs(TABLE, b, seeds, part)) for b in BASELINES}
            verdict = headline(part, "hsplitlora", BASELINES, runs, 0.8)
            assert verdict is not None
            print(f"\n{planner}: " + verdict.line(0.8))
        for label, where in (("current", HERE), *([("server held", HELD)] if held else [])):
            for v in capacity:
                print(f"\n{v} against {label}: " + _race(
                    _runs(where, "hsplitlora", seeds, part),
                    _runs(TABLE / "capacity", v, seeds, part), v))


def _race(ours: list[Path], theirs: list[Path], name: str) -> str:
    """Each side's simulated time to the other's final held-out loss, as a share of the
    other's whole run, per seed (None: never reached)."""
    out = []
    for a, b in zip(ours, theirs, strict=True):
        ca, cb = loss_curve(a), loss_curve(b)
        assert ca is not None and cb is not None
        t_ab, t_ba = time_to_loss(ca, cb.final), time_to_loss(cb, ca.final)

        def share(t: float | None, whole: float, whose: str) -> str:
            return ("never reaches it" if t is None
                    else f"reaches it in {t / whole:.2f}x of {whose} simulated time")

        theirs_s, ours_s = name + "'s", "hsplitlora's"
        out.append(f"against {theirs_s} final eval loss {cb.final:.4f} hsplitlora "
                   f"{share(t_ab, cb.seconds[-1], theirs_s)}; against {ours_s} "
                   f"{ca.final:.4f} {name} {share(t_ba, ca.seconds[-1], ours_s)}")
    return "; ".join(out) + "."


if __name__ == "__main__":
    main()
