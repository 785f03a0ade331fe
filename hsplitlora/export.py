"""Hand a finished run over: a merged standalone model, or the PEFT adapter assembled
from the two halves a deployment with a separate fed server leaves behind.

A merged model is the base with every LoRA update folded into its weights, saved with
its tokenizer, so ``AutoModelForCausalLM.from_pretrained(out)`` needs neither peft nor
hsplitlora. The merge is done in float32: folded into bf16 weights a small update would
round away (see :func:`hsplitlora.train.run.load_trained`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

import torch

from hsplitlora.config import ConfigError, RunConfig, load_config
from hsplitlora.errors import UserError

__all__ = ["ExportError", "assemble_adapter", "export_merged"]

log = logging.getLogger(__name__)

CLIENT_HALF = "client_adapter.safetensors"
SERVER_HALF = "server_adapter.safetensors"


class ExportError(UserError, ValueError):
    """A run folder cannot be exported as asked; the message says why and what to do."""


def _check_out(out: Path, overwrite: bool) -> None:
    """Nothing already saved is lost unless asked: an occupied ``out`` needs ``overwrite``."""
    occupied = any(out.iterdir()) if out.is_dir() else out.exists()
    if not occupied:
        return
    if not overwrite:
        raise ExportError(f"{out} exists and is not empty: pass --overwrite to replace it, "
                          "or choose another folder")
    if out.is_dir():
        shutil.rmtree(out)
    else:
        out.unlink()


def assemble_adapter(run_dir: Path, client_adapter: Path | None = None) -> Path:
    """``run_dir/adapter`` (PEFT layout) from a ``serve`` run's server half and the fed
    server's client half (default: the ``<run>-fed`` folder beside the run's)."""
    from safetensors.torch import load_file

    from hsplitlora.models.load import load_model_config
    from hsplitlora.models.lora import LoraSettings, save_peft_adapter
    from hsplitlora.models.split import arch_spec
    from hsplitlora.train.run import base_source

    run_dir = Path(run_dir)
    server = run_dir / SERVER_HALF
    client = client_adapter or run_dir.with_name(f"{run_dir.name}-fed") / CLIENT_HALF
    for half, what in ((server, "server"), (client, "client")):
        if not half.is_file():
            raise ExportError(f"the {what} half {half} is missing: "
                              + ("pass the fed server's file with --client-adapter"
                                 if what == "client" else f"is {run_dir} a `serve` run folder?"))
    cfg = _config(run_dir)
    state = {**load_file(str(client)), **load_file(str(server))}
    lora = LoraSettings(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout)
    spec = arch_spec(load_model_config(cfg.model.name))
    out = save_peft_adapter(state, lora, run_dir / "adapter", base_model=base_source(cfg),
                            fan_in_fan_out=spec.fan_in_fan_out)
    log.info("wrote %s from %s and %s", out, client, server)
    return out


def _config(run_dir: Path) -> RunConfig:
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run folder: config.yaml is missing")
    try:
        return load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise ExportError(f"{run_dir}/config.yaml no longer validates: {e}") from None


def export_merged(run_dir: Path, out: Path, *,
                  dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                  overwrite: bool = False) -> Path:
    """Write the run's fine-tuned model, adapters merged in, with its tokenizer, to ``out``."""
    from peft import PeftModel

    from hsplitlora.models.load import load_model

    run_dir, out = Path(run_dir), Path(out)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        hint = (" (a `serve` run with a separate fed server: run `hsplitlora export "
                f"{run_dir} --client-adapter FED/{CLIENT_HALF}` first)"
                if (run_dir / SERVER_HALF).is_file() else "")
        raise ExportError(f"{run_dir} holds no adapter ({adapter} is missing){hint}")
    _check_out(out, overwrite)
    cfg = _config(run_dir)
    model, tokenizer = load_model(cfg.model.name, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    merged.config.use_cache = True  # off for training (models/load.py); on for inference
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    log.info("wrote the merged model of %s to %s (%s)", run_dir, out, dtype)
    return out
