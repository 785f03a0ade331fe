"""One party's share of a networked run, from the same recipes the simulation uses.

Every process of a deployment calls :func:`hsplitlora.train.run.prepare` on the same
config, so the base model, the LoRA initialisation (seeded) and the data partition come
out identical everywhere; each then keeps only its own part, built by
:mod:`hsplitlora.train.parties` exactly as the in-process run builds it: that is what
makes a networked run bit-identical to the simulation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hsplitlora.models.lora import lora_state
from hsplitlora.modes import MODES
from hsplitlora.roles.fedserver import FedServer
from hsplitlora.roles.server import MainServer
from hsplitlora.train.parties import (
    ClientRecipe,
    client_recipes,
    fed_server,
    server_recipe,
    split_segments,
)
from hsplitlora.train.prepared import Prepared
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.fed import FedService, adapter_layout, round_timeout
from hsplitlora.transport.plan import WirePlan, value_bound
from hsplitlora.transport.validate import Layout

__all__ = ["build_client", "build_fed", "build_fed_service", "build_server",
           "client_adapter_layout"]


def _check_mode(p: Prepared) -> None:
    if "grpc" not in p.cfg.mode.placements:
        networked = [m.name for m in MODES.values() if "grpc" in m.placements]
        raise ValueError(f"train.mode {p.cfg.train.mode!r} cannot run over the network: "
                         f"serve and join support {', '.join(networked)}")


def build_client(p: Prepared, client_id: int) -> ClientRecipe:
    """Client ``client_id``'s recipe: its segment, its own shard, its optimizer."""
    _check_mode(p)
    t = p.cfg.train
    if not 0 <= client_id < t.num_clients:
        raise ValueError(f"client id {client_id} is out of range: the config has "
                         f"train.num_clients={t.num_clients} (ids 0..{t.num_clients - 1})")
    return client_recipes(p, [client_id])[0]


def _plan(p: Prepared, dtype: torch.dtype) -> WirePlan:
    t = p.cfg.train
    mc: Any = p.model.config
    return WirePlan(mode=t.mode, steps=t.steps, interval=t.agg_interval, cut=t.cut,
                num_clients=t.num_clients, batch_size=t.batch_size,
                max_length=p.cfg.data.max_length, hidden_size=int(mc.hidden_size),
                vocab_size=int(mc.vocab_size), dtype=dtype,
                samples=tuple(len(shard) for shard in p.shards), tail=t.tail)


def build_server(p: Prepared) -> tuple[MainServer, WirePlan]:
    """The main server and the run's plan."""
    _check_mode(p)
    recipe = server_recipe(p)
    # Activations leave the client in the dtype of the frozen base weights (the server's
    # copy of the backbone starts with the embeddings, a U-shaped middle has no head).
    dtype = next(recipe.segment.backbone.parameters()).dtype
    return recipe.build(p.device), _plan(p, dtype)


def build_fed(p: Prepared) -> FedServer:
    return fed_server(p)


def client_adapter_layout(p: Prepared) -> Layout:
    """Names, dtypes and shapes of a client-side adapter (a U-shaped client's tail
    included): what the fed server accepts."""
    client_seg, _, tail = split_segments(p)
    tail_state = {} if tail is None else lora_state(tail)
    return adapter_layout({**lora_state(client_seg), **tail_state})


def build_fed_service(p: Prepared, net: NetConfig, *,
                      checkpoint: Path | None = None) -> FedService:
    """The fed server's rounds, with what it checks uploads against: the adapter layout,
    each client's shard size and the value bound; a round may open as late as the main
    server's slowest round allows."""
    mc: Any = p.model.config
    return FedService(build_fed(p), client_adapter_layout(p), net.step_timeout_s,
                      checkpoint=checkpoint,
                      open_timeout_s=round_timeout(net, p.cfg.train.num_clients),
                      samples=tuple(len(shard) for shard in p.shards),
                      bound=value_bound(int(mc.hidden_size), net.max_activation))
