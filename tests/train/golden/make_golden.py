"""Writes the reference runs the uniform-plan equivalence tests compare with.

Run once, on the commit named in ``README.md`` beside this file (the last one before the
one-engine refactor), from the repository root:

    python -m tests.train.golden.make_golden

Each reference is a tiny fp32 run: its per-step losses and its final adapter. The new
engine must reproduce them (tests/train/test_uniform_plans.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from tests.conftest import tiny_model
from tests.train.golden.runs import RUNS, config_for

HERE = Path(__file__).resolve().parent


def main() -> None:
    from tests.conftest import tiny_tokenizer as fixture

    tok = fixture.__wrapped__()  # the session fixture's body, called directly
    from hsplitlora.train.run import train

    for name in sys.argv[1:] or RUNS:
        cfg = config_for(name)
        result = train(cfg, model=tiny_model(RUNS[name]["arch"]), tokenizer=tok, write=False,
                       show_progress=False)
        losses = [r["loss"] for r in result.records if "event" not in r]
        save_file({k: v.contiguous() for k, v in result.adapter.items()},
                  HERE / f"{name}.safetensors")
        (HERE / f"{name}.json").write_text(json.dumps({"losses": losses}, indent=1))
        print(name, len(losses), losses[-1])


if __name__ == "__main__":
    main()
