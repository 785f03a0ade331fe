"""Simulated wall-clock: how long a run would take on the configured devices.

A one-process simulation runs every party on the same CPU, so its wall time says nothing
about a deployment. This module replays a run's metrics (tokens and bytes of every step,
bytes of every aggregation) against device profiles and the cost model:

* split modes (a main server runs the blocks past the cut): within a round, clients
  compute their forward in parallel on their own devices, upload, and queue at the main
  server, which serves one client at a time in arrival order (SplitLoRA's server is one
  device); each client then downloads its gradient and runs its backward. The round
  ends when the last client finishes.
* the relay schedule (vanilla SL): one client at a time, so steps add up.
* unsplit modes (FedLoRA, the federated heterogeneous baselines): each client runs the
  whole model on its own device; rounds take the slowest client.
* the centralized schedule: one client-class device does everything (the CenLoRA
  baseline of the papers: no parallelism).
* an aggregation takes the slowest client link: each client uploads what it holds and
  downloads what it gets back (the event's ``links``, bytes per client; the server-side
  adapters never cross a client's link). Records without ``links`` (older runs) charge
  an equal share of the total to the slowest link.
* importance probing (``probe`` events, HSplitLoRA) runs each client's probe batches as
  split steps that back-propagate through every block and to every weight (3x the
  forward on both sides), the clients in parallel, the main server serving one at a
  time: it takes the longer of the slowest client's own time and the server's total.
* plans follow the run: the ``plan`` event sets every client's cut and ranks, each
  ``replan`` event (after a round's aggregation) those of the rounds after it.

Compute time is cost-model FLOPs over the device's sustained FLOP/s; a transfer runs at
the slower end of the link. Latency and queueing on the network are not modelled.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hsplitlora.hetero.costmodel import ModelDims, Workload, client_flops, server_flops
from hsplitlora.hetero.profiles import DeviceProfile
from hsplitlora.modes import Mode

__all__ = ["PARTS", "simulate", "simulated_parts"]

# What a run's simulated seconds are spent on (:func:`simulated_parts`).
PARTS = ("steps", "aggregation", "probing")


def simulate(
    records: Sequence[Mapping[str, Any]],
    *,
    mode: Mode,
    unsplit: bool = False,
    dims: ModelDims,
    cuts: Mapping[int, int],
    ranks: Mapping[int, Mapping[str, int]],
    clients: Sequence[DeviceProfile],
    server: DeviceProfile,
    batch: int,
    seq: int,
    precision: str,
    tail: int = 0,
) -> list[float]:
    """Simulated seconds at the end of each round (cumulative). ``unsplit``: the clients
    run the whole model although the mode splits it (``hetero.federated``); ``tail``: the
    clients keep that many last blocks (a U-shaped split)."""
    steps: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    aggs: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    replans: dict[int, Mapping[str, Any]] = {}
    cuts, ranks = dict(cuts), dict(ranks)
    for r in records:
        if "event" not in r:
            steps[r["round"]].append(r)
        elif r["event"] in ("aggregate", "handoff", "probe", "start"):
            aggs[r["round"]].append(r)
        elif r["event"] == "plan":
            cuts, ranks = _plans(r, cuts, ranks)
        elif r["event"] == "replan":
            replans[r["round"]] = r
    work = Workload.for_precision(precision, batch=batch, seq=seq)
    n_layers = dims.n_layers
    clock, out = 0.0, []
    for rnd in sorted(steps):
        if unsplit or not mode.split:
            per = []
            for s in steps[rnd]:
                device = clients[s["client"] or 0]
                f = client_flops(dims, n_layers, ranks.get(s["client"] or 0, {}), work)
                per.append(f.total / device.flops)
            clock += sum(per) if mode.schedule == "centralized" else max(per)
        else:
            clock += _split_round(steps[rnd], mode.schedule == "relay", dims, cuts, ranks,
                                  clients, server, work, tail)
        for a in aggs.get(rnd, []):
            if a["event"] == "probe":
                clock += _probe(a["links"], dims, clients, server, work, tail)
            elif "links" in a:
                clock += max((_transfer(clients[cid], server, up, down)
                              for cid, up, down in a["links"]), default=0.0)
            else:
                n = max(len(clients), 1)
                slowest = min(clients, key=lambda p: min(p.uplink_bps, p.downlink_bps))
                clock += (a.get("bytes_up", 0) / n) / slowest.uplink_bps
                clock += (a.get("bytes_down", 0) / n) / slowest.downlink_bps
        if rnd in replans:
            cuts, ranks = _plans(replans[rnd], cuts, ranks)
        out.append(clock)
    return out


def simulated_parts(records: Sequence[Mapping[str, Any]], **kw: Any) -> dict[str, float]:
    """The run's simulated seconds split into what they were spent on: the training steps
    (activations, gradients and compute), the aggregations (adapters up, aggregates or
    merged updates down, and a HetLoRA start) and importance probing. Each part adds its
    rounds' seconds to the clock, so dropping its records takes exactly its share away;
    ``kw`` as :func:`simulate` takes them."""
    def total(keep: Callable[[Mapping[str, Any]], bool]) -> float:
        times = simulate([r for r in records if keep(r)], **kw)
        return times[-1] if times else 0.0

    whole = total(lambda r: True)
    probing = whole - total(lambda r: r.get("event") != "probe")
    steps = total(lambda r: r.get("event") not in ("probe", "aggregate", "start", "handoff"))
    return {"steps": steps, "aggregation": whole - steps - probing, "probing": probing}


def _plans(event: Mapping[str, Any], cuts: Mapping[int, int],
           ranks: Mapping[int, Mapping[str, int]]) -> tuple[dict[int, int],
                                                           dict[int, Mapping[str, int]]]:
    """Cuts and ranks per client from a ``plan``/``replan`` event (client id = position)."""
    new_cuts, new_ranks = dict(cuts), dict(ranks)
    for cid, plan in enumerate(event["plans"]):
        new_cuts[cid] = int(plan["cut"])
        new_ranks[cid] = dict(plan["ranks"])
    return new_cuts, new_ranks


def _transfer(dev: DeviceProfile, server: DeviceProfile, up: float, down: float) -> float:
    """Seconds to move ``up`` bytes from a client and ``down`` bytes back to it."""
    return (up / min(dev.uplink_bps, server.downlink_bps)
            + down / min(server.uplink_bps, dev.downlink_bps))


def _probe(links: Sequence[Sequence[int]], dims: ModelDims, clients: Sequence[DeviceProfile],
           server: DeviceProfile, work: Workload, tail: int = 0) -> float:
    """Seconds of one importance probe: per client ``[id, bytes up, bytes down,
    batches, cut]``; each batch a forward and a backward to every weight on both sides
    (a U-shaped client's tail on its side)."""
    own, served = 0.0, 0.0
    for cid, up, down, batches, cut in links:
        dev = clients[cid]
        client = 3 * client_flops(dims, cut, {}, work, tail).forward / dev.flops
        own = max(own, batches * client + _transfer(dev, server, up, down))
        served += batches * 3 * server_flops(dims, cut, {}, work, tail).forward / server.flops
    return max(own, served)


def _split_round(steps: Sequence[Mapping[str, Any]], sequential: bool, dims: ModelDims,
                 cuts: Mapping[int, int], ranks: Mapping[int, Mapping[str, int]],
                 clients: Sequence[DeviceProfile], server: DeviceProfile,
                 work: Workload, tail: int = 0) -> float:
    timings = []
    for s in steps:
        cid = s["client"]
        dev, cut, plan = clients[cid], cuts[cid], ranks.get(cid, {})
        cf = client_flops(dims, cut, plan, work)
        serving = server_flops(dims, cut, plan, work, tail).total / server.flops
        up, down = s["bytes_up"], s["bytes_down"]
        if tail:
            # The server waits for the tail's round trip between its two hops (it serves
            # one client at a time): the activations at L - t down, the tail's forward and
            # backward on the client, its gradient (as large) up.
            hop = down / 2
            tail_s = (client_flops(dims, cut, plan, work, tail).total - cf.total) / dev.flops
            serving += (hop / min(server.uplink_bps, dev.downlink_bps) + tail_s
                        + hop / min(dev.uplink_bps, server.downlink_bps))
            up, down = up - hop, down - hop
        timings.append((
            cf.forward / dev.flops,
            up / min(dev.uplink_bps, server.downlink_bps),
            serving,
            down / min(server.uplink_bps, dev.downlink_bps),
            cf.backward / dev.flops,
        ))
    if sequential:  # one client at a time
        return sum(sum(t) for t in timings)
    arrivals = sorted((fwd + up, i) for i, (fwd, up, _, _, _) in enumerate(timings))
    server_free, end = 0.0, 0.0
    for arrival, i in arrivals:
        start = max(arrival, server_free)
        server_free = start + timings[i][2]
        end = max(end, server_free + timings[i][3] + timings[i][4])
    return end
