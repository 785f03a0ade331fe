"""Build one party's role objects from a prepared run, exactly as the in-process run does.

Every process of a deployment calls :func:`hsplitlora.train.run.prepare` on the same
config, so the base model, the LoRA initialisation (seeded) and the data partition come
out identical everywhere; each then keeps only its own part. The constructions below
mirror ``hsplitlora.train.run.run_mode`` argument for argument: that is what makes a
networked run bit-identical to the simulation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from hsplitlora.data.tokenize import pad_id_for
from hsplitlora.models.lora import lora_state
from hsplitlora.models.split import ClientSegment, split_model
from hsplitlora.roles.client import Client
from hsplitlora.roles.fedserver import FedServer
from hsplitlora.roles.server import MainServer
from hsplitlora.train.batches import batch_stream
from hsplitlora.train.run import Prepared, _optim, party_seed
from hsplitlora.transport.fed import adapter_layout
from hsplitlora.transport.plan import NETWORKED_MODES, Plan
from hsplitlora.transport.validate import Layout

__all__ = ["ClientParty", "build_client", "build_fed", "build_server", "client_adapter_layout"]

Batches = Iterator[dict[str, torch.Tensor]]


def _check_mode(p: Prepared) -> None:
    if p.cfg.train.mode not in NETWORKED_MODES:
        raise ValueError(f"train.mode {p.cfg.train.mode!r} cannot run over the network: "
                         f"serve and join support {', '.join(NETWORKED_MODES)}")


class ClientParty:
    """What a client process needs to (re)build its :class:`Client` at any point: its
    segment, and a factory for its batch stream from the start."""

    def __init__(self, p: Prepared, client_id: int, segment: ClientSegment) -> None:
        t = p.cfg.train
        if not 0 <= client_id < t.num_clients:
            raise ValueError(f"client id {client_id} is out of range: the config has "
                             f"train.num_clients={t.num_clients} (ids 0..{t.num_clients - 1})")
        self.client_id = client_id
        self.segment = segment
        self.num_samples = len(p.shards[client_id])
        self._features = p.shards[client_id].features
        self._batch_size = t.batch_size
        self._seed = party_seed(t.seed, client_id)
        self._pad = pad_id_for(p.tokenizer)
        self._optim = _optim(p.cfg, t.steps)
        self._precision = t.precision
        self._device = p.device

    def stream(self) -> Batches:
        return batch_stream(self._features, self._batch_size, self._seed, self._pad)

    def client(self, batches: Batches) -> Client:
        return Client(self.client_id, self.segment, batches, self.num_samples, self._optim,
                      precision=self._precision, device=self._device)


def build_client(p: Prepared, client_id: int) -> ClientParty:
    _check_mode(p)
    client_seg, _ = split_model(p.model, p.cfg.train.cut)
    return ClientParty(p, client_id, client_seg)


def _plan(p: Prepared, dtype: torch.dtype) -> Plan:
    t = p.cfg.train
    mc: Any = p.model.config
    return Plan(mode=t.mode, steps=t.steps, interval=t.agg_interval, cut=t.cut,
                num_clients=t.num_clients, batch_size=t.batch_size,
                max_length=p.cfg.data.max_length, hidden_size=int(mc.hidden_size),
                vocab_size=int(mc.vocab_size), dtype=dtype)


def build_server(p: Prepared) -> tuple[MainServer, Plan]:
    """The main server and the run's plan."""
    _check_mode(p)
    t = p.cfg.train
    _, server_seg = split_model(p.model, t.cut)
    per_client = t.mode == "splitfed"
    server = MainServer(server_seg, range(t.num_clients),
                        _optim(p.cfg, t.steps if per_client else t.steps * t.num_clients),
                        per_client=per_client, precision=t.precision, device=p.device,
                        label_smoothing=t.label_smoothing)
    # Activations leave the client in the dtype of the frozen base weights.
    dtype = next(server_seg.lm_head.parameters()).dtype
    return server, _plan(p, dtype)


def build_fed(p: Prepared) -> FedServer:
    return FedServer(weighting=p.cfg.train.agg_weighting, alpha=p.lora.alpha)


def client_adapter_layout(p: Prepared) -> Layout:
    """Names, dtypes and shapes of a client-side adapter: what the fed server accepts."""
    client_seg, _ = split_model(p.model, p.cfg.train.cut)
    return adapter_layout(lora_state(client_seg))
