"""Print (and optionally write as markdown) the coverage table of the split.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/coverage_sweep.py --timeout 40 \\
        --log sweep.log --markdown docs/architectures_table.md [model_type ...]

Each result is also appended to ``--log`` as one JSON line; entries already in the log are
not run again, so an interrupted sweep resumes where it stopped (delete the log to start
over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import warnings
from pathlib import Path

from hsplitlora.models.coverage import Result, check, registry, text_decoder


class _Timeout(BaseException):  # noqa: N818 - not an Exception: check() must not catch it
    pass


def _alarm(*_: object) -> None:
    raise _Timeout


def _run(model_type: str, timeout: int) -> Result:
    # transformers may install its own SIGALRM handler (remote-code prompts): reinstall ours
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        return check(model_type)
    except _Timeout:
        return Result(model_type, "skipped", f"over {timeout} s (tiny config too big)")
    finally:
        signal.alarm(0)


def _table(results: list[Result]) -> tuple[str, list[str]]:
    lines = ["| architecture | text decoder | result | max logit err | max grad excess | reason |",
             "|---|---|---|---|---|---|"]
    def err(value: float) -> str:
        return f"{value:.1e}" if value >= 0 else "n/a"  # < 0: not recorded

    for r in results:
        reason = r.reason.replace("|", "/").replace("\n", " ")[:240]
        lines.append(f"| {r.model_type} | {'yes' if text_decoder(r.model_type) else 'no'} | "
                     f"{r.status} | {err(r.logit_err)} | {err(r.grad_err)} | {reason} |")
    decoders = [r for r in results if text_decoder(r.model_type)]
    tried = [r for r in decoders if r.status != "skipped"]
    exact = [r for r in tried if r.status == "exact"]
    wrong = [r.model_type for r in results if r.status == "wrong"]
    count = {s: sum(r.status == s for r in results) for s in ("exact", "refused", "skipped")}
    summary = (f"text-only decoders: {len(decoders)} in the registry, {len(tried)} built "
               f"tiny, {len(exact)} exact at every cut "
               f"({100 * len(exact) / max(len(tried), 1):.1f} % of those built, "
               f"{100 * len(exact) / max(len(decoders), 1):.1f} % of all); "
               f"all {len(results)} entries: {count['exact']} exact, {count['refused']} "
               f"refused, {len(wrong)} wrong {wrong}, {count['skipped']} skipped")
    return summary, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_types", nargs="*")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--log", type=Path, help="JSON lines of results, resumed from")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per architecture")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    done: dict[str, Result] = {}
    if args.log and args.log.exists():
        for line in args.log.read_text().splitlines():
            r = Result(**json.loads(line))
            done[r.model_type] = r
    results = []
    for model_type in args.model_types or registry():
        result = done.get(model_type) or _run(model_type, args.timeout)
        if model_type not in done and args.log:
            with args.log.open("a") as log:
                log.write(json.dumps(dataclasses.asdict(result)) + "\n")
        results.append(result)
        print(f"{model_type:28s} {result.status:8s} "
              f"{'decoder' if text_decoder(model_type) else 'other':8s} "
              f"{result.seconds:5.1f}s {result.reason[:150]}", flush=True)
    summary, lines = _table(results)
    print(summary)
    if args.markdown:
        args.markdown.write_text("\n".join([summary, "", *lines, ""]))
    return 1 if any(r.status == "wrong" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
