"""Score a finished run: generate once per distinct test MR, the five E2E metrics, and the
held-out perplexity, written into the run folder in the official scorer's file formats."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hsplitlora.config import ConfigError, RunConfig, load_config
from hsplitlora.data.e2e import group_references
from hsplitlora.data.load import load_examples
from hsplitlora.data.tokenize import TokenizedDataset, pad_id_for
from hsplitlora.errors import UserError
from hsplitlora.eval.generate import GenerationSettings, generate
from hsplitlora.eval.metrics import score
from hsplitlora.eval.perplexity import perplexity
from hsplitlora.runtime.device import resolve_device
from hsplitlora.runtime.process import keep_freed_memory, set_threads
from hsplitlora.train.run import load_trained

__all__ = [
    "PREDICTIONS_FILE",
    "REFERENCES_FILE",
    "SCORES_FILE",
    "RunDirError",
    "check_adapter",
    "check_run_dir",
    "evaluate_run",
    "spread_subset",
    "write_references",
]

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.txt"
REFERENCES_FILE = "references.txt"
SCORES_FILE = "scores.json"


class RunDirError(UserError, ValueError):
    """A path is not a finished run folder; the message says what is missing."""


def check_run_dir(run_dir: Path) -> Path:
    """The run folder, if it holds what evaluation needs (config and adapter)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run folder {run_dir} does not exist; pass a folder written by "
                          "`hsplitlora train` (output.dir/output.name of its config)")
    for needed in ("config.yaml", "adapter/adapter_model.safetensors"):
        if not (run_dir / needed).is_file():
            raise RunDirError(f"{run_dir} is not a finished run: {needed} is missing (a run "
                              "writes its adapter when training ends; re-run it if it stopped)")
    return run_dir


def check_adapter(path: Path) -> None:
    """Refuse an adapter file that is damaged (unreadable safetensors) or holds non-finite
    weights: evaluating it would give tracebacks, or a NaN score that looks like a result."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise RunDirError(f"adapter {path} is damaged and cannot be read ({e}); re-export it "
                          "from the run's checkpoint or re-run training") from None
    bad = sorted(k for k, v in state.items()
                 if v.is_floating_point() and not bool(v.isfinite().all()))
    if bad:
        raise RunDirError(f"adapter {path} holds non-finite weights (NaN/inf) in {bad[0]}"
                          + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else "")
                          + "; it is corrupted or the run diverged: re-run training")


def spread_subset(n_items: int, limit: int | None) -> list[int]:
    """``limit`` indices evenly spread over ``range(n_items)`` (all when ``limit`` is None).

    The E2E test set is sorted by restaurant name, so its first 50 MRs would cover three
    restaurants; evenly spaced ones cover them all, and every run of a grid gets the same.
    """
    if limit is None or limit >= n_items:
        return list(range(n_items))
    return [i * n_items // limit for i in range(limit)]


def write_references(path: Path, references: Sequence[Sequence[str]]) -> None:
    """The E2E scorer's multi-reference format: one reference per line, one blank line
    between the groups of consecutive hypotheses."""
    path.write_text("\n\n".join("\n".join(group) for group in references) + "\n",
                    encoding="utf-8")


def _perplexity_features(cfg: RunConfig, tokenizer: Any) -> TokenizedDataset | None:
    """The held-out examples training evaluated on: the same sample of the same file."""
    if cfg.eval.max_examples == 0:
        return None
    examples = [e for e in load_examples(cfg.data, "eval", tokenizer) if e.target]
    if not examples:
        return None
    if len(examples) > cfg.eval.max_examples:
        rng = random.Random(cfg.train.seed + 1)  # as hsplitlora.train.run.prepare draws it
        picked = sorted(rng.sample(range(len(examples)), cfg.eval.max_examples))
        examples = [examples[i] for i in picked]
    return TokenizedDataset(examples, tokenizer, cfg.data.max_length)


def evaluate_run(
    run_dir: Path,
    *,
    max_mrs: int | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    show_progress: bool = False,
    with_perplexity: bool = True,
    untuned: bool = False,
) -> dict[str, Any]:
    """Generate, score and write ``predictions.txt``, ``references.txt``, ``scores.json``.

    Unset arguments come from the run's own config: ``eval.max_mrs``, ``eval.num_beams``
    (with the other E2E decoding defaults), ``eval.batch_size``, ``train.device``.
    ``scores.json`` is written last, so its presence means the evaluation completed.
    Returns what ``scores.json`` holds: the five metrics by the scorer's names, ``eval_loss``
    / ``eval_ppl`` (None when ``eval.max_examples`` is 0 or ``with_perplexity`` is off:
    training already measured it on the same sample), the settings and timings.
    ``untuned=True`` also scores the base model without the run's adapter on the same MRs
    (``result["untuned"]``, and ``untuned_predictions.txt``), for a before/after table.
    """
    run_dir = check_run_dir(run_dir)
    check_adapter(run_dir / "adapter" / "adapter_model.safetensors")
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise RunDirError(f"{run_dir}/config.yaml no longer validates: {e}") from None
    if not (cfg.data.eval_split if cfg.data.dataset == "hf" else cfg.data.eval_file):
        raise RunDirError(f"{run_dir}/config.yaml names no held-out data (data.eval_file, or "
                          "data.eval_split for dataset 'hf'): evaluation needs references")
    settings = settings or GenerationSettings(num_beams=cfg.eval.num_beams)
    max_mrs = max_mrs if max_mrs is not None else cfg.eval.max_mrs
    batch_size = batch_size or cfg.eval.batch_size
    set_threads(cfg.train.threads)
    if cfg.train.keep_memory:
        keep_freed_memory()
    dev = resolve_device(device or cfg.train.device)
    model, tokenizer, _ = load_trained(run_dir, device=str(dev))

    prompts, refs = group_references(load_examples(cfg.data, "eval", tokenizer))
    keep = [i for i in spread_subset(len(prompts), max_mrs) if refs[i]]
    prompts, refs = [prompts[i] for i in keep], [refs[i] for i in keep]
    log.info("generating for %d MRs (beam %d) from %s", len(prompts), settings.num_beams, run_dir)
    start = time.perf_counter()
    predictions = generate(model, tokenizer, prompts, settings, batch_size=batch_size,
                           device=dev, show_progress=show_progress)
    generate_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = score(predictions, refs)
    score_s = time.perf_counter() - start

    loss = ppl = None
    features = _perplexity_features(cfg, tokenizer) if with_perplexity else None
    if features is not None:
        loss, ppl = perplexity(model, features.features, pad_id=pad_id_for(tokenizer),
                               batch_size=batch_size, precision=cfg.train.precision, device=dev,
                               multiple=cfg.data.pad_to_multiple_of)

    if loss is not None and not math.isfinite(loss):
        raise RunDirError(f"{run_dir}: the adapter gives a non-finite eval_loss ({loss}); "
                          "it is damaged or the run diverged, so no score is written")

    baseline: dict[str, Any] | None = None
    if untuned:
        from hsplitlora.models.load import load_model

        base, _ = load_model(cfg.model.name, dtype=model.dtype)
        base_predictions = generate(base.to(dev), tokenizer, prompts, settings,
                                    batch_size=batch_size, device=dev,
                                    show_progress=show_progress)
        baseline = score(base_predictions, refs).as_dict()
        if features is not None:
            baseline["eval_loss"], baseline["eval_ppl"] = perplexity(
                base, features.features, pad_id=pad_id_for(tokenizer), batch_size=batch_size,
                precision=cfg.train.precision, device=dev, multiple=cfg.data.pad_to_multiple_of)
        (run_dir / "untuned_predictions.txt").write_text("\n".join(base_predictions) + "\n",
                                                        encoding="utf-8")

    result: dict[str, Any] = {
        **scores.as_dict(),
        **({"untuned": baseline} if baseline is not None else {}),
        "eval_loss": loss,
        "eval_ppl": ppl,
        "eval_examples": len(features) if features is not None else 0,
        "num_mrs": len(prompts),
        "max_mrs": max_mrs,
        "settings": settings.as_dict(),
        "generate_s": generate_s,
        "score_s": score_s,
    }
    (run_dir / PREDICTIONS_FILE).write_text("\n".join(predictions) + "\n", encoding="utf-8")
    write_references(run_dir / REFERENCES_FILE, refs)
    (run_dir / SCORES_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
