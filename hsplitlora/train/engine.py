"""The one round loop every mode runs, and the three schedules it runs.

:func:`run_rounds` is the whole training loop: each round, the schedule trains what the
round holds and then ends it (aggregation, hand-off, re-plan when due), the recorder
closes the round, and the checkpoint callback saves the loop's state. What differs
between modes lives in a :class:`Schedule` and in what it is given (compare Flower's
``Strategy``: one loop, methods per strategy):

* :class:`Centralized`: one learner, all data, one step a round (CenLoRA).
* :class:`Relay`: vanilla split learning; clients take turns, the client-side adapter is
  handed on every ``I`` steps (one round per turn).
* :class:`Parallel`: every present client takes a local step each round; every ``I``
  rounds the mode's aggregation combines the parties that trained since the previous
  one (FedLoRA, SplitLoRA, SFL-V1, FFA-LoRA and the heterogeneous system alike: they
  differ only in their step and their aggregation).

Each schedule only calls role methods and passes tensors, so any role can sit behind a
transport. ``attendance(round)`` (default: everyone) gives the clients present in a round
(:mod:`hsplitlora.train.attendance`).

Resuming: ``checkpoint(round, loop)`` is called as each round ends with the schedule's
own state (what is not in the roles: who trained since the last aggregation, the last
aggregate, the relay's position); a resumed run builds its schedule with that state as
``loop``, its roles already restored, and starts at the round after the checkpoint's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from hsplitlora.roles.client import Client
from hsplitlora.roles.fedserver import FedServer
from hsplitlora.roles.learner import Learner
from hsplitlora.roles.messages import nbytes
from hsplitlora.roles.server import MainServer
from hsplitlora.train.placement import Attendance, Deferred, PartyLost, total
from hsplitlora.train.recorder import Recorder

__all__ = ["Attendance", "Centralized", "Parallel", "Relay", "Schedule", "attending",
           "client_step", "everyone", "fedavg_clients", "learner_step", "run_centralized",
           "run_federated", "run_rounds", "run_split", "run_splitfed", "run_splitlora"]

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
Checkpoint = Callable[[int, dict[str, Any]], None]


def everyone(round: int) -> None:
    """The default attendance: no client ever misses a round."""
    return None


def attending(parties: Sequence[Any], attendance: Attendance, round: int) -> list[Any]:
    """The parties (clients, learners or their proxies) present in ``round``."""
    here = attendance(round)
    return list(parties) if here is None else [p for p in parties if p.client_id in here]


class Schedule(Protocol):
    """One mode's rounds, as :func:`run_rounds` drives them."""

    def train(self, round: int) -> None:
        """Every step the round holds."""

    def end(self, round: int, last: bool) -> None:
        """What closes the round (aggregation, hand-off, re-plan) when it is due."""

    def loop_state(self) -> dict[str, Any]:
        """The schedule's own state, for a checkpoint (``loop`` of a resumed one)."""

    def result(self) -> State:
        """The final adapter under the unsplit model's names (both sides together)."""


def run_rounds(schedule: Schedule, rounds: int, rec: Recorder, *, start: int = 0,
               checkpoint: Checkpoint | None = None) -> State:
    """The training loop of every mode: rounds ``start`` .. ``rounds - 1`` of ``schedule``."""
    for t in range(start, rounds):
        schedule.train(t)
        schedule.end(t, t + 1 == rounds)
        rec.end_round(t)
        if checkpoint is not None:
            checkpoint(t, schedule.loop_state())
    return schedule.result()


# -- steps ----------------------------------------------------------------------------------
def client_step(client: Client, server: MainServer, rec: Recorder, round: int, *,
                local: bool = False) -> bool:
    """One split step: the client's forward, the server's step, the client's backward.
    In a U-shaped split (the client holds the tail and the labels) the server's step is
    two hops: its middle blocks forward, the client's tail takes the loss, the tail's
    gradient goes back through the middle. ``local``: the client runs the server segment
    itself (nothing crosses a network). Returns False if a remote client went away, or a
    remote server refused its step (the round goes on without it)."""
    up: int | Deferred
    down: int | Deferred
    try:
        acts = client.forward()
        if not client.holds_tail:
            reply = server.step(client.client_id, acts)
            grad, up, down = reply.grad, acts.nbytes, reply.nbytes
        else:
            reply = client.finish(server.forward(client.client_id, acts))
            grad = server.backward(client.client_id, reply.grad)
            # down: the activations at L - t (the size of their gradient) and the cut's grad
            up, down = total(acts.nbytes, reply.nbytes), total(reply.nbytes, acts.grad_nbytes)
    except PartyLost as e:
        log.warning("round %d goes on without client %d: %s", round, client.client_id, e)
        return False
    client.backward(grad)
    rec.train_step(round=round, client=client.client_id, loss=reply.loss, tokens=reply.tokens,
                   bytes_up=0 if local else up, bytes_down=0 if local else down, lr=server.lr)
    return True


def learner_step(learner: Learner, rec: Recorder, round: int) -> bool:
    """One step of a party that trains the whole model itself."""
    loss, tokens = learner.step()
    rec.train_step(round=round, client=learner.client_id, loss=loss, tokens=tokens, lr=learner.lr)
    return True


def fedavg_clients(clients: Sequence[Client | Learner], among: Sequence[Client | Learner],
                   fed: FedServer, rec: Recorder, round: int) -> State:
    """FedAvg over ``among`` (the clients that trained since the last aggregation); every
    client continues from the result. Only the factors the clients train travel, as each
    client uploads them (clipped and noised under ``privacy``)."""
    states = [c.upload() for c in among]
    merged = fed.aggregate(states, [c.num_samples for c in among])
    for c in clients:
        c.load_adapter_state(merged)
    up = {c.client_id: nbytes(fed.uploaded(s)) for c, s in zip(among, states, strict=True)}
    down = nbytes(fed.uploaded(merged))
    links = [[c.client_id, up.get(c.client_id, 0), down] for c in clients]  # per client link
    rec.event("aggregate", round=round, side="client", clients=[c.client_id for c in among],
              links=links, bytes_up=sum(up.values()), bytes_down=down * len(clients))
    return merged


# -- schedules ------------------------------------------------------------------------------
class Centralized:
    """One learner over all the data: one step per round, nothing to aggregate."""

    def __init__(self, learner: Learner, rec: Recorder) -> None:
        self.learner, self.rec = learner, rec

    def train(self, round: int) -> None:
        learner_step(self.learner, self.rec, round)

    def end(self, round: int, last: bool) -> None:
        self.rec.global_model(round, self.learner.adapter_state)

    def loop_state(self) -> dict[str, Any]:
        return {}

    def result(self) -> State:
        return self.learner.adapter_state()


class Relay:
    """Sequential split learning: each client trains ``handoff`` steps, then relays its
    adapter to the next (one round per turn; the hand-off is recorded in the round that
    ends with it)."""

    def __init__(self, clients: Sequence[Client], server: MainServer, steps: int, handoff: int,
                 rec: Recorder, loop: Mapping[str, Any] | None = None) -> None:
        self.clients, self.server, self.rec = clients, server, rec
        self.steps, self.handoff = steps, handoff
        self.done = list(loop["done"]) if loop else [0] * len(clients)
        self.holder = loop["holder"] if loop else 0

    def train(self, round: int) -> None:
        client = self.clients[self.holder]
        for _ in range(min(self.handoff, self.steps - self.done[self.holder])):
            client_step(client, self.server, self.rec, round)
            self.done[self.holder] += 1

    def end(self, round: int, last: bool) -> None:
        client = self.clients[self.holder]
        nxt = (self.holder + 1) % len(self.clients)
        if nxt != self.holder:
            state = client.adapter_state()
            self.clients[nxt].load_adapter_state(state)
            self.rec.event("handoff", round=round, source=client.client_id,
                           target=self.clients[nxt].client_id, bytes_up=nbytes(state),
                           bytes_down=nbytes(state))
        self.rec.global_model(round, lambda: {**client.adapter_state(),
                                              **self.server.adapter_state()})
        self.holder = nxt

    def loop_state(self) -> dict[str, Any]:
        return {"done": list(self.done), "holder": self.holder}

    def result(self) -> State:
        final = self.clients[(self.holder - 1) % len(self.clients)].adapter_state()
        return {**final, **self.server.adapter_state()}


class Parallel:
    """Every present party takes one local step per round; every ``interval`` rounds (and
    after the last) ``aggregate`` combines the parties that trained since the previous
    aggregation and returns the global adapter it made (or None: the mode keeps it
    elsewhere, e.g. merged into the base).

    ``step(party, round)`` is the mode's step (False: the party went away).
    ``view(last_aggregate)`` is the global model after it (SplitLoRA adds the shared
    server side as it is then), ``result(last_aggregate)`` the run's final adapter.
    """

    def __init__(self, parties: Sequence[Any], step: Callable[[Any, int], bool],
                 aggregate: Callable[[list[Any], int, bool], State | None],
                 result: Callable[[State], State], interval: int, rec: Recorder,
                 attendance: Attendance = everyone, loop: Mapping[str, Any] | None = None,
                 view: Callable[[State], State] = dict) -> None:
        self.parties, self.step, self.aggregate = parties, step, aggregate
        self._result, self.interval, self.rec, self.attendance = result, interval, rec, attendance
        self.view = view
        loop = loop or {}
        self.merged: State = dict(loop.get("merged", {}))
        self.trained: set[int | None] = set(loop.get("trained", ()))

    def train(self, round: int) -> None:
        for party in attending(self.parties, self.attendance, round):
            if self.step(party, round):
                self.trained.add(party.client_id)

    def end(self, round: int, last: bool) -> None:
        if ((round + 1) % self.interval and not last) or not self.trained:
            return
        among = [p for p in self.parties if p.client_id in self.trained]
        self.trained = set()
        merged = self.aggregate(among, round, last)
        if merged is not None:
            self.merged = merged
            self.rec.global_model(round, lambda m=merged: self.view(m))

    def loop_state(self) -> dict[str, Any]:
        return {"merged": self.merged, "trained": sorted(self.trained)}

    def result(self) -> State:
        return self._result(self.merged)


# -- the homogeneous modes, as their schedules -------------------------------------------------
def run_centralized(learner: Learner, steps: int, rec: Recorder, *, start: int = 0,
                    checkpoint: Checkpoint | None = None) -> State:
    return run_rounds(Centralized(learner, rec), steps, rec, start=start, checkpoint=checkpoint)


def run_split(clients: Sequence[Client], server: MainServer, steps: int, handoff: int,
              rec: Recorder, *, start: int = 0, loop: Mapping[str, Any] | None = None,
              checkpoint: Checkpoint | None = None) -> State:
    rounds = len(clients) * -(-steps // handoff)
    return run_rounds(Relay(clients, server, steps, handoff, rec, loop), rounds, rec,
                      start=start, checkpoint=checkpoint)


def run_federated(learners: Sequence[Learner], fed: FedServer, steps: int, interval: int,
                  rec: Recorder, attendance: Attendance = everyone, *, start: int = 0,
                  loop: Mapping[str, Any] | None = None,
                  checkpoint: Checkpoint | None = None) -> State:
    """FedLoRA / FFA-LoRA: each learner trains the whole model; adapters FedAvg'd."""
    schedule = Parallel(
        learners, lambda p, t: learner_step(p, rec, t),
        lambda among, t, last: fedavg_clients(learners, among, fed, rec, t),
        lambda merged: merged or learners[0].adapter_state(), interval, rec, attendance, loop)
    return run_rounds(schedule, steps, rec, start=start, checkpoint=checkpoint)


def run_splitlora(clients: Sequence[Client], server: MainServer, fed: FedServer, steps: int,
                  interval: int, rec: Recorder, attendance: Attendance = everyone, *,
                  start: int = 0, loop: Mapping[str, Any] | None = None,
                  checkpoint: Checkpoint | None = None) -> State:
    """SplitLoRA (SFL-V2): one shared server-side adapter; client sides FedAvg'd."""
    schedule = Parallel(
        clients, lambda c, t: client_step(c, server, rec, t),
        lambda among, t, last: fedavg_clients(clients, among, fed, rec, t),
        lambda merged: {**(merged or clients[0].adapter_state()), **server.adapter_state()},
        interval, rec, attendance, loop, view=lambda m: {**m, **server.adapter_state()})
    return run_rounds(schedule, steps, rec, start=start, checkpoint=checkpoint)


def run_splitfed(clients: Sequence[Client], server: MainServer, fed: FedServer, steps: int,
                 interval: int, rec: Recorder, attendance: Attendance = everyone, *,
                 start: int = 0, loop: Mapping[str, Any] | None = None,
                 checkpoint: Checkpoint | None = None) -> State:
    """SFL-V1: one server-side adapter per client; both sides FedAvg'd."""
    if not server.per_client:
        raise ValueError("splitfed needs a MainServer with per_client=True (SFL-V1)")

    def aggregate(among: list[Client], t: int, last: bool) -> State:
        client_side = fedavg_clients(clients, among, fed, rec, t)
        server_states = [server.adapter_state(c.client_id) for c in among]
        server_side = fed.aggregate(server_states, [c.num_samples for c in among])
        server.load_adapter_state(server_side)
        rec.event("aggregate", round=t, side="server", bytes_up=0, bytes_down=0)
        return {**client_side, **server_side}

    schedule = Parallel(
        clients, lambda c, t: client_step(c, server, rec, t), aggregate,
        lambda merged: merged or {**clients[0].adapter_state(), **server.adapter_state()},
        interval, rec, attendance, loop)
    return run_rounds(schedule, steps, rec, start=start, checkpoint=checkpoint)

