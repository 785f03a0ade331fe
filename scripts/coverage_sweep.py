"""Print (and optionally write as markdown) the coverage table of the split.

    PYTHONPATH=. python scripts/coverage_sweep.py [--markdown docs/architectures_table.md]
        [model_type ...]
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path

from hsplitlora.models.coverage import Result, check, registry, text_decoder


class _Timeout(BaseException):  # noqa: N818 - not an Exception: check() must not catch it
    pass


def _alarm(*_: object) -> None:
    raise _Timeout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_types", nargs="*")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--timeout", type=int, default=60, help="seconds per architecture")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    signal.signal(signal.SIGALRM, _alarm)
    results: list[tuple[Result, bool]] = []
    for model_type in args.model_types or registry():
        signal.alarm(args.timeout)
        try:
            result = check(model_type)
        except _Timeout:
            result = Result(model_type, "skipped", f"over {args.timeout} s (tiny config too big)")
        finally:
            signal.alarm(0)
        decoder = text_decoder(model_type)
        results.append((result, decoder))
        print(f"{model_type:28s} {result.status:8s} {'decoder' if decoder else 'other':8s} "
              f"{result.seconds:5.1f}s {result.reason[:150]}", flush=True)
    lines = ["| architecture | text decoder | result | max logit err | max grad err | reason |",
             "|---|---|---|---|---|---|"]
    for r, decoder in results:
        reason = r.reason.replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {r.model_type} | {'yes' if decoder else 'no'} | {r.status} | "
                     f"{r.logit_err:.1e} | {r.grad_err:.1e} | {reason} |")
    decoders = [r for r, d in results if d]
    tried = [r for r in decoders if r.status != "skipped"]
    exact = [r for r in tried if r.status == "exact"]
    wrong = [r.model_type for r, _ in results if r.status == "wrong"]
    summary = (f"text-only decoders: {len(decoders)} in the registry, {len(tried)} built "
               f"tiny, {len(exact)} exact at every cut "
               f"({100 * len(exact) / max(len(tried), 1):.1f} % of those built); "
               f"all entries: {sum(r.status == 'exact' for r, _ in results)} exact, "
               f"{sum(r.status == 'refused' for r, _ in results)} refused, "
               f"{len(wrong)} wrong {wrong}, "
               f"{sum(r.status == 'skipped' for r, _ in results)} skipped")
    print(summary)
    if args.markdown:
        args.markdown.write_text("\n".join([summary, "", *lines, ""]))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
