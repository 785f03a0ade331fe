"""Checks a run's settings against the model's config and the data before the weights
load, so a wrong cut, target, client count or device fails in seconds, not after the
model and data are loaded and a sample is generated."""

from __future__ import annotations

import importlib.util
from typing import Any

from hsplitlora.config import ConfigError, RunConfig
from hsplitlora.data.load import check_labels, load_examples, subsample
from hsplitlora.data.partition import partition
from hsplitlora.models.lora import check_targets
from hsplitlora.models.split import arch_spec, num_blocks
from hsplitlora.privacy.config import delta_problem
from hsplitlora.runtime.device import resolve_device

__all__ = ["TRACKER_PACKAGES", "preflight"]

# The package each output.report_to entry needs, and the extra that installs it.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def preflight(cfg: RunConfig, model_config: Any = None) -> None:
    """Raise the error a person can act on for anything wrong that shows without weights.

    ``model_config`` is the config of a model handed in; by default the configured
    model's is read (config.json alone; a default alias is fetched once, as loading would).
    """
    t = cfg.train
    resolve_device(t.device)  # a CUDA device that is not there
    for tracker in cfg.output.report_to:
        package = TRACKER_PACKAGES[tracker]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"output.report_to has {tracker!r} but the {package} package "
                              f"is not installed: pip install 'hsplitlora[{tracker}]'")
    if cfg.model.quantization != "none":
        if cfg.mode.planned:
            raise ConfigError(f"model.quantization is not available in mode {t.mode!r}: the "
                              "heterogeneous modes merge aggregated updates into the base "
                              "weights, which a quantised base cannot hold exactly; use a "
                              "homogeneous mode (e.g. splitlora), or model.quantization: none")
        if t.backend == "ray":
            raise ConfigError("model.quantization does not run on train.backend 'ray' yet: "
                              "use the in-process backend or serve / join")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("model.quantization needs the bitsandbytes package: pip "
                              "install 'hsplitlora[quantization]'")
    if model_config is None:
        from hsplitlora.models.load import load_model_config

        model_config = load_model_config(cfg.model.name)
    spec = arch_spec(model_config)
    blocks = num_blocks(model_config)
    if cfg.model.quantization != "none" and spec.fan_in_fan_out:
        raise ConfigError(f"model.quantization needs blocks of nn.Linear layers; "
                          f"{model_config.model_type}'s Conv1D layers are not supported: set "
                          "model.quantization: none")
    name = cfg.model.name
    # A fixed cut: every split mode's, and a planned mode's with ARMSC switched off.
    if cfg.mode.split and not (cfg.mode.planned and cfg.hetero.adaptive):
        if t.cut > blocks:
            raise ConfigError(f"train.cut {t.cut} is out of range: {name} has {blocks} blocks, "
                              f"so the cut must be in 0..{blocks} (blocks [0, cut) run on the "
                              "clients)")
        if t.tail and t.cut + t.tail >= blocks:
            raise ConfigError(f"train.tail {t.tail} with train.cut {t.cut} leaves the server no "
                              f"block: {name} has {blocks} blocks and the server runs blocks "
                              f"[cut, {blocks} - tail); lower train.tail or train.cut so that "
                              f"cut + tail < {blocks}")
    top = blocks - t.tail  # a planned cut leaves the server a block before any tail
    bad_cuts = [c for c in cfg.hetero.cuts or [] if not 1 <= c < top]
    held = f" and a tail of {t.tail}" if t.tail else ""
    if cfg.mode.planned and top < 2:
        raise ConfigError(f"train.tail {t.tail} leaves no cut to plan: {name} has {blocks} "
                          "blocks, and a planned client keeps at least one while the server "
                          f"keeps one before the tail; lower train.tail below {blocks - 1}")
    if cfg.mode.planned and bad_cuts:
        raise ConfigError(f"hetero.cuts {bad_cuts} are out of range: {name} has {blocks} "
                          f"blocks{held}, so a planned cut is in 1..{top - 1}")
    if cfg.lora.targets is not None:
        check_targets(spec, cfg.lora.targets)
    examples = load_examples(cfg.data, "train")
    check_labels(cfg.data, examples)
    shards = partition(subsample(examples, cfg.data.max_train_examples, t.seed), t.num_clients,
                       cfg.data.partition, t.seed, alpha=cfg.data.dirichlet_alpha,
                       label_key=cfg.data.label_key)
    smallest = min(len(s) for s in shards)
    if cfg.privacy.enabled and (problem := delta_problem(cfg.privacy.delta, smallest,
                                                         "the data's partition")):
        raise ConfigError(problem)
    if cfg.eval.every and cfg.eval.max_examples and not load_examples(cfg.data, "eval"):
        raise ConfigError("eval.every asks for evaluations during training, but the config "
                          "names no held-out data: set data.eval_file (data.eval_split for "
                          "dataset 'hf') or eval.every: 0")
