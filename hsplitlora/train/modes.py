"""The training schedules: who computes what, in which order, and when adapters move.

Each mode only calls role methods and passes tensors, so any role can sit behind a
transport. Every mode returns the final adapter under the unsplit model's names (client
and server halves together), ready for PEFT export.

* ``centralized``: one party, whole model, all data (the CenLoRA baseline).
* ``federated``: every client holds the whole model and trains it on its shard; adapters
  FedAvg'd every ``I`` local steps (the FedLoRA baseline; no split).
* ``split``: vanilla split learning: clients take turns; the one client-side adapter is
  handed from client to client every ``I`` steps; one server-side adapter.
* ``splitfed``: SFL-V1: clients in parallel, one server-side copy per client; both sides
  FedAvg'd every ``I`` local steps.
* ``splitlora``: SplitLoRA as its paper and code do it (SFL-V2): clients in parallel,
  one shared server-side adapter updated on each client's batch in turn, client-side
  adapters FedAvg'd by the fed server every ``I`` local steps.

``attendance(round)`` (default: everyone) gives the clients present in a round
(:mod:`hsplitlora.train.attendance`); an aggregation averages over the clients that
trained since the previous one and every client continues from the result.

Resuming: ``checkpoint(round, loop)`` is called as each round ends, with the loop's own
state (what is not in the roles: who trained since the last aggregation, the last
aggregate, the relay's position); a resumed run passes that state back as ``loop`` with
``start`` the round after the checkpoint's, its roles already restored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hsplitlora.roles.client import Client
from hsplitlora.roles.fedserver import FedServer
from hsplitlora.roles.learner import Learner
from hsplitlora.roles.messages import nbytes
from hsplitlora.roles.server import MainServer
from hsplitlora.train.placement import Attendance
from hsplitlora.train.recorder import Recorder

__all__ = ["Attendance", "attending", "everyone", "run_centralized", "run_federated",
           "run_split", "run_splitfed", "run_splitlora"]

State = dict[str, torch.Tensor]
Checkpoint = Callable[[int, dict[str, Any]], None]


def everyone(round: int) -> None:
    """The default attendance: no client ever misses a round."""
    return None


def attending(parties: Sequence[Any], attendance: Attendance, round: int) -> list[Any]:
    """The parties (clients, learners or their proxies) present in ``round``."""
    here = attendance(round)
    return list(parties) if here is None else [p for p in parties if p.client_id in here]


def _client_step(client: Client, server: MainServer, rec: Recorder, round: int) -> None:
    acts = client.forward()
    reply = server.step(client.client_id, acts)
    client.backward(reply.grad)
    rec.train_step(round=round, client=client.client_id, loss=reply.loss, tokens=reply.tokens,
                   bytes_up=acts.nbytes, bytes_down=reply.nbytes, lr=server.lr)


def _fedavg_clients(clients: Sequence[Client | Learner], among: Sequence[Client | Learner],
                    fed: FedServer, rec: Recorder, round: int) -> State:
    """FedAvg over ``among`` (the clients that trained since the last aggregation); every
    client continues from the result."""
    states = [c.adapter_state() for c in among]
    merged = fed.aggregate(states, [c.num_samples for c in among])
    for c in clients:
        c.load_adapter_state(merged)
    rec.event("aggregate", round=round, side="client", clients=[c.client_id for c in among],
              bytes_up=sum(nbytes(fed.uploaded(s)) for s in states),
              bytes_down=nbytes(fed.uploaded(merged)) * len(clients))
    return merged


def _trained(parties: Sequence[Client | Learner], ids: set[int | None]) -> list[Client | Learner]:
    return [p for p in parties if p.client_id in ids]


def _averaging_loop(loop: Mapping[str, Any] | None) -> tuple[State, set[int | None]]:
    """The last aggregate and who trained since, from a checkpoint's loop state."""
    loop = loop or {}
    return dict(loop.get("merged", {})), set(loop.get("trained", ()))


def _saved(checkpoint: Checkpoint | None, t: int, merged: State,
           trained: set[int | None]) -> None:
    if checkpoint is not None:
        checkpoint(t, {"merged": merged, "trained": sorted(trained)})


def run_centralized(learner: Learner, steps: int, rec: Recorder, *, start: int = 0,
                    checkpoint: Checkpoint | None = None) -> State:
    for t in range(start, steps):
        loss, tokens = learner.step()
        rec.train_step(round=t, client=None, loss=loss, tokens=tokens, lr=learner.lr)
        rec.global_model(t, learner.adapter_state)
        rec.end_round(t)
        if checkpoint is not None:
            checkpoint(t, {})
    return learner.adapter_state()


def run_federated(learners: Sequence[Learner], fed: FedServer, steps: int, interval: int,
                  rec: Recorder, attendance: Attendance = everyone, *, start: int = 0,
                  loop: Mapping[str, Any] | None = None,
                  checkpoint: Checkpoint | None = None) -> State:
    merged, trained = _averaging_loop(loop)
    for t in range(start, steps):
        for learner in attending(learners, attendance, t):
            loss, tokens = learner.step()
            rec.train_step(round=t, client=learner.client_id, loss=loss, tokens=tokens,
                           lr=learner.lr)
            trained.add(learner.client_id)
        if ((t + 1) % interval == 0 or t + 1 == steps) and trained:
            merged = _fedavg_clients(learners, _trained(learners, trained), fed, rec, t)
            trained = set()
            rec.global_model(t, lambda m=merged: m)
        rec.end_round(t)
        _saved(checkpoint, t, merged, trained)
    return merged or learners[0].adapter_state()


def run_split(clients: Sequence[Client], server: MainServer, steps: int, handoff: int,
              rec: Recorder, *, start: int = 0, loop: Mapping[str, Any] | None = None,
              checkpoint: Checkpoint | None = None) -> State:
    """Sequential split learning: each client trains ``handoff`` steps, then relays (one
    round per turn; the hand-off is recorded in the round that ends with it)."""
    done = list(loop["done"]) if loop else [0] * len(clients)
    holder = loop["holder"] if loop else 0
    rnd = start
    while any(d < steps for d in done):
        client = clients[holder]
        for _ in range(min(handoff, steps - done[holder])):
            _client_step(client, server, rec, rnd)
            done[holder] += 1
        nxt = (holder + 1) % len(clients)
        if nxt != holder:
            state = client.adapter_state()
            clients[nxt].load_adapter_state(state)
            rec.event("handoff", round=rnd, source=client.client_id,
                      target=clients[nxt].client_id, bytes_up=nbytes(state),
                      bytes_down=nbytes(state))
        rec.global_model(rnd, lambda c=client: {**c.adapter_state(), **server.adapter_state()})
        rec.end_round(rnd)
        holder = nxt
        if checkpoint is not None:
            checkpoint(rnd, {"done": list(done), "holder": holder})
        rnd += 1
    final = clients[(holder - 1) % len(clients)].adapter_state()
    return {**final, **server.adapter_state()}


def run_splitlora(clients: Sequence[Client], server: MainServer, fed: FedServer, steps: int,
                  interval: int, rec: Recorder, attendance: Attendance = everyone, *,
                  start: int = 0, loop: Mapping[str, Any] | None = None,
                  checkpoint: Checkpoint | None = None) -> State:
    merged, trained = _averaging_loop(loop)
    for t in range(start, steps):
        for client in attending(clients, attendance, t):
            _client_step(client, server, rec, t)
            trained.add(client.client_id)
        if ((t + 1) % interval == 0 or t + 1 == steps) and trained:
            merged = _fedavg_clients(clients, _trained(clients, trained), fed, rec, t)
            trained = set()
            rec.global_model(t, lambda m=merged: {**m, **server.adapter_state()})
        rec.end_round(t)
        _saved(checkpoint, t, merged, trained)
    return {**(merged or clients[0].adapter_state()), **server.adapter_state()}


def run_splitfed(clients: Sequence[Client], server: MainServer, fed: FedServer, steps: int,
                 interval: int, rec: Recorder, attendance: Attendance = everyone, *,
                 start: int = 0, loop: Mapping[str, Any] | None = None,
                 checkpoint: Checkpoint | None = None) -> State:
    if not server.per_client:
        raise ValueError("splitfed needs a MainServer with per_client=True (SFL-V1)")
    merged, trained = _averaging_loop(loop)
    for t in range(start, steps):
        for client in attending(clients, attendance, t):
            _client_step(client, server, rec, t)
            trained.add(client.client_id)
        if ((t + 1) % interval == 0 or t + 1 == steps) and trained:
            among = _trained(clients, trained)
            trained = set()
            client_side = _fedavg_clients(clients, among, fed, rec, t)
            server_states = [server.adapter_state(c.client_id) for c in among]
            server_side = fed.aggregate(server_states, [c.num_samples for c in among])
            server.load_adapter_state(server_side)
            rec.event("aggregate", round=t, side="server", bytes_up=0, bytes_down=0)
            merged = {**client_side, **server_side}
            rec.global_model(t, lambda m=merged: m)
        rec.end_round(t)
        _saved(checkpoint, t, merged, trained)
    return merged or {**clients[0].adapter_state(), **server.adapter_state()}

