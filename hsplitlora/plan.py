"""``hsplitlora plan``: a config's per-client plans without training it (from the model's
shapes alone with ``meta``, or after probing importance on each client's shard)."""

from __future__ import annotations

import torch
from torch import nn

from hsplitlora.config import RunConfig
from hsplitlora.hetero.armsc import Plan
from hsplitlora.hetero.costmodel import ModelDims
from hsplitlora.hetero.planner import Planner, probe_importance
from hsplitlora.train.hetero import HeteroSystem
from hsplitlora.train.parties import optim_settings, probe_stream
from hsplitlora.train.run import base_dtype, mean_length, prepare, streams

__all__ = ["meta_model", "plan_run"]


def meta_model(cfg: RunConfig) -> nn.Module:
    """The config's model built from its ``config.json`` on the meta device: every shape
    and the storage dtype, no weights and no memory (a LLaMA-2-7B plans on a laptop)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.model.name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config,
                                                torch_dtype=getattr(torch, base_dtype(cfg)))


def plan_run(cfg: RunConfig, *, probe: bool = True, meta: bool = False) -> tuple[Plan, ModelDims]:
    """What ``hsplitlora plan`` shows: the per-client plans of a config, without training.

    With ``probe``, importance (when the mode uses it) is measured by split probing on
    each client's shard, as training does; without, every matrix weighs the same and the
    plan comes from the cost model alone, in seconds. ``meta``: plan from the model's
    shapes alone (:func:`meta_model`), for sequences of ``data.max_length`` tokens, with
    the uninformed gains (no weights, so no probing).
    """
    t = cfg.train
    if meta:
        model = meta_model(cfg)
        params = sum(x.numel() for x in model.parameters())
        planner = Planner(cfg, model, cfg.hetero.scenario.profiles(t.num_clients, params),
                          cfg.hetero.scenario.server_profile(), cfg.data.max_length)
        return planner.client_plans(None), planner.dims
    p = prepare(cfg)
    params = sum(x.numel() for x in p.model.parameters())
    planner = Planner(cfg, p.model, cfg.hetero.scenario.profiles(t.num_clients, params),
                      cfg.hetero.scenario.server_profile(), mean_length(p.shards))
    scores = None
    if planner.uses_importance and probe:
        optim = optim_settings(cfg, t.steps)
        system = HeteroSystem(p.model, planner.provisional(), streams(p),
                              [len(s) for s in p.shards], client_optim=optim,
                              server_optim=optim, alpha=cfg.lora.alpha,
                              precision=t.precision, device=p.device, tail=t.tail,
                              probes=[probe_stream(p, c) for c in range(t.num_clients)])
        scores = planner.observe(probe_importance(system, cfg.hetero.probe_batches,
                                                  t.precision, t.label_smoothing)[0])
    return planner.client_plans(scores), planner.dims
