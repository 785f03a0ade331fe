"""The Ray backend: every client and the main server as a Ray actor (``train.backend: ray``).

Each actor is one process that builds its role from its recipe
(:mod:`hsplitlora.train.parties`) and runs the role's own methods: there is no second
implementation of training. The driver runs the unchanged training mode against proxies
with the roles' methods; activations and gradients go from actor to actor through Ray's
object store and never pass through the driver.

Concurrency comes from the proxies answering at once: ``forward`` returns a handle, the
server's ``step`` takes that handle and returns one for the gradient, the client's
``backward`` takes that. So within a round every client's forward runs at the same time,
the server takes the uploads in the mode's order (Ray runs one caller's calls to an actor
in the order they were made, which keeps a run step for step equal to the in-process
one), and each client's backward overlaps the server's next step. Losses and byte counts
come back as :class:`~hsplitlora.train.placement.Deferred` values that the recorder
settles at the end of the round.

Ray is an optional dependency: ``pip install 'hsplitlora[ray]'``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from hsplitlora.models.shared import merge_states
from hsplitlora.roles.messages import Activations
from hsplitlora.runtime.process import keep_freed_memory
from hsplitlora.train.config import RayConfig
from hsplitlora.train.placement import Attendance, Deferred, Recipe

__all__ = ["RayPlacement"]

log = logging.getLogger(__name__)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RuntimeError("train.backend 'ray' needs Ray: pip install 'hsplitlora[ray]' (or "
                           "pip install ray), or set train.backend: inprocess") from None
    return ray


def _cpu(x: Any) -> Any:
    """Tensors leave an actor on the CPU, so a GPU actor can feed a CPU-only one."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, Activations):
        return Activations(x.hidden.cpu(), x.attention_mask.cpu(),
                           None if x.labels is None else x.labels.cpu())
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    return x


class RoleActor:
    """Hosts one role in a Ray worker process."""

    def __init__(self, recipe: Recipe, threads: int, gpus: float, keep_memory: bool) -> None:
        torch.set_num_threads(threads)
        if keep_memory:
            keep_freed_memory()
        cuda = gpus > 0 and torch.cuda.is_available()
        self.role = recipe.build(torch.device("cuda" if cuda else "cpu"))

    def ready(self) -> tuple[str, int]:
        import socket

        return socket.gethostname(), os.getpid()

    def call(self, method: str, *args: Any) -> Any:
        return _cpu(getattr(self.role, method)(*args))

    def item(self, name: str, key: Any = None) -> Any:
        """An attribute of the role (``key``: one entry of it), as a copy."""
        value = getattr(self.role, name)
        return value if key is None else value[key]

    def items(self, *names: str) -> tuple[Any, ...]:
        """Several attributes of the role in one round trip, as copies."""
        return tuple(getattr(self.role, name) for name in names)

    def forward(self) -> tuple[tuple[int, int], Activations]:
        acts = _cpu(self.role.forward())
        return (acts.nbytes, acts.grad_nbytes), acts

    def step(self, client_id: int, acts: Activations) -> tuple[tuple[float, int, int, float],
                                                                torch.Tensor]:
        reply = self.role.step(client_id, acts)
        return (reply.loss, reply.tokens, reply.nbytes, self.role.lr), reply.grad.cpu()

    def finish(self, returned: torch.Tensor) -> tuple[tuple[float, int, int], torch.Tensor]:
        """A U-shaped client's tail on the server's activations."""
        reply = self.role.finish(returned)
        return (reply.loss, reply.tokens, reply.nbytes), reply.grad.cpu()

    def back(self, client_id: int, grad: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The U-shaped server's backward through its middle blocks."""
        out = self.role.backward(client_id, grad).cpu()
        return self.role.lr, out

    def learn(self) -> tuple[float, int, float]:
        loss, tokens = self.role.step()
        return loss, tokens, self.role.lr


class _Remote:
    """What every proxy shares: its actor, and the calls it has not yet checked."""

    def __init__(self, ray: Any, actor: Any) -> None:
        self._ray = ray
        self.actor = actor
        self._unchecked: list[Any] = []

    def _fire(self, method: str, *args: Any) -> None:
        """A call whose result nobody needs; its failure surfaces at the next wait."""
        self._unchecked.append(self.actor.call.remote(method, *args))

    def wait(self) -> None:
        """Re-raise the first failure among the calls made so far."""
        pending, self._unchecked = self._unchecked, []
        self._ray.get(pending)

    def _get(self, ref: Any) -> Any:
        self.wait()
        return self._ray.get(ref)

    def _deferred(self, ref: Any, index: int | None = None) -> Deferred:
        return Deferred(lambda: self._get(ref) if index is None else self._get(ref)[index])

    def adapter_state(self, *args: Any) -> dict[str, torch.Tensor]:
        return self._get(self.actor.call.remote("adapter_state", *args))

    def upload(self) -> dict[str, torch.Tensor]:
        return self._get(self.actor.call.remote("upload"))

    def load_adapter_state(self, state: Mapping[str, torch.Tensor], *args: Any) -> None:
        self._fire("load_adapter_state", dict(state), *args)

    def apply_update(self, updates: Mapping[str, Any], *args: Any) -> None:
        self._fire("apply_update", dict(updates), *args)

    def replace_segment(self, *args: Any) -> None:
        """A new segment travels whole, with what was merged into its weights so far (the
        actor goes on merging from there exactly as this process would)."""
        self._fire("replace_segment", *args, merge_states(args[-1]))

    def replace_segments(self, segments: Mapping[int, Any]) -> None:
        """Several segments in one message, so views of one segment arrive as views."""
        widest = min(segments.values(), key=lambda s: s.first_block)
        self._fire("replace_segments", dict(segments), merge_states(widest))

    def state_dict(self) -> dict[str, Any]:
        return self._get(self.actor.call.remote("state_dict"))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._fire("load_state_dict", dict(state))


class _RemoteActivations:
    def __init__(self, ref: Any, nbytes: Deferred, grad_nbytes: Deferred) -> None:
        self.ref = ref
        self.nbytes = nbytes
        self.grad_nbytes = grad_nbytes


class _RemoteReply:
    def __init__(self, meta: Any, grad: Any, remote: _Remote) -> None:
        self.grad = grad  # a reference, handed straight to the client's actor
        self.loss = remote._deferred(meta, 0)
        self.tokens = remote._deferred(meta, 1)
        self.nbytes = remote._deferred(meta, 2)


class RemoteClient(_Remote):
    def __init__(self, ray: Any, actor: Any, recipe: Any) -> None:
        super().__init__(ray, actor)
        self.client_id = recipe.client_id
        self.num_samples = recipe.num_samples
        self.holds_tail = recipe.tail is not None

    def forward(self) -> _RemoteActivations:
        sizes, acts = self.actor.forward.options(num_returns=2).remote()
        return _RemoteActivations(acts, self._deferred(sizes, 0), self._deferred(sizes, 1))

    def finish(self, returned: Any) -> _RemoteReply:
        meta, grad = self.actor.finish.options(num_returns=2).remote(returned)
        return _RemoteReply(meta, grad, self)

    def backward(self, grad: Any) -> None:
        self._fire("backward", grad)

    def reset_adapters(self, settings: Any) -> None:
        self._fire("reset_adapters", settings)

    def score(self, n: int, server: Any) -> dict[str, float]:
        """Importance probing in the driver, on a copy of the actor's segment (and tail)
        and probe batches, so the server-side scorer can answer right here."""
        from hsplitlora.hetero.importance import segment_importance

        segment, tail, precision, smoothing = self._get(self.actor.items.remote(
            "segment", "tail", "precision", "label_smoothing"))
        batches = self._get(self.actor.call.remote("probe_batches", n))
        return segment_importance(segment, batches, server, precision, tail=tail,
                                  label_smoothing=smoothing)


class RemoteServer(_Remote):
    def __init__(self, ray: Any, actor: Any, recipe: Any) -> None:
        super().__init__(ray, actor)
        self.per_client = recipe.per_client
        self._lr: Deferred | None = None

    def step(self, client_id: int, acts: Any) -> _RemoteReply:
        upload = acts.ref if isinstance(acts, _RemoteActivations) else acts
        meta, grad = self.actor.step.options(num_returns=2).remote(client_id, upload)
        self._lr = self._deferred(meta, 3)
        return _RemoteReply(meta, grad, self)

    def forward(self, client_id: int, acts: _RemoteActivations) -> Any:
        """A U-shaped step's middle: a reference to the activations at the client's tail."""
        return self.actor.call.remote("forward", client_id, acts.ref)

    def backward(self, client_id: int, grad: Any) -> Any:
        lr, out = self.actor.back.options(num_returns=2).remote(client_id, grad)
        self._lr = self._deferred(lr)
        return out

    @property
    def lr(self) -> Deferred:
        assert self._lr is not None, "the server's LR is read after its first step"
        return self._lr

    @property
    def segments(self) -> _RemoteSegments:
        return _RemoteSegments(self)


class _RemoteSegments:
    """``server.segments[cid]``: a copy of one server-side segment, fetched on demand."""

    def __init__(self, server: RemoteServer) -> None:
        self._server = server

    def __getitem__(self, client_id: int) -> Any:
        return self._server._get(self._server.actor.item.remote("segments", client_id))


class RemoteLearner(_Remote):
    def __init__(self, ray: Any, actor: Any, recipe: Any) -> None:
        super().__init__(ray, actor)
        self.client_id = recipe.client_id
        self.num_samples = recipe.num_samples
        self._last: Any = None

    def step(self) -> tuple[Deferred, Deferred]:
        self._last = self.actor.learn.remote()
        return self._deferred(self._last, 0), self._deferred(self._last, 1)

    @property
    def lr(self) -> Deferred:
        return self._deferred(self._last, 2)


_PROXIES = {"client": RemoteClient, "server": RemoteServer, "learner": RemoteLearner}


class RayPlacement:
    """Starts (or joins) Ray and places each role in an actor with its resources."""

    def __init__(self, settings: RayConfig, threads: int | None, num_actors: int, *,
                 keep_memory: bool = True) -> None:
        self.ray = _ray()
        self.settings = settings
        self.threads = threads
        self.keep_memory = keep_memory
        self.actors: list[Any] = []
        self._proxies: list[_Remote] = []
        self._owns_ray = not self.ray.is_initialized()
        if self._owns_ray:
            self._init(num_actors)

    def _init(self, num_actors: int) -> None:
        s = self.settings
        kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING,
                                      runtime_env=s.runtime_env)
        if s.address:
            self.ray.init(address=s.address, **kwargs)
            log.info("joined the Ray cluster at %s: %s", s.address,
                     self.ray.cluster_resources())
            return
        # A local Ray offers at least one logical CPU per actor, so a small machine still
        # places them all (they then share its cores).
        need = num_actors * max(s.client_cpus, s.server_cpus)
        cpus = max(math.ceil(need), os.cpu_count() or 1)
        self.ray.init(num_cpus=cpus, num_gpus=torch.cuda.device_count(), **kwargs)
        log.info("started a local Ray with %d CPUs", cpus)

    def place(self, recipe: Recipe, kind: str) -> _Remote:
        s = self.settings
        server = kind == "server"
        cpus = s.server_cpus if server else s.client_cpus
        gpus = s.server_gpus if server else s.client_gpus
        threads = self.threads or max(1, int(cpus))
        actor = self.ray.remote(RoleActor).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0,
        ).remote(recipe, threads, gpus, self.keep_memory)
        self.actors.append(actor)
        proxy = _PROXIES[kind](self.ray, actor, recipe)
        self._proxies.append(proxy)
        return proxy

    def watch_base(self, base: torch.nn.Module) -> None:
        pass  # segments travel whole, inside the recipes

    def attendance(self, simulated: Attendance) -> Attendance:
        return simulated

    def fed_aggregation(self) -> None:
        return None  # the driver aggregates, as in process

    def started(self) -> None:
        """Wait until every actor runs; name what is missing if the cluster cannot place
        them (a request larger than any node stays pending forever otherwise)."""
        timeout = self.settings.start_timeout_s
        try:
            where = self.ray.get([a.ready.remote() for a in self.actors], timeout=timeout)
        except self.ray.exceptions.GetTimeoutError:
            free = self.ray.available_resources()
            raise RuntimeError(
                f"Ray did not start all {len(self.actors)} actors within {timeout:.0f} s "
                f"(ray.start_timeout_s). They ask for {self.settings.client_cpus} CPU / "
                f"{self.settings.client_gpus} GPU per client and {self.settings.server_cpus} "
                f"CPU / {self.settings.server_gpus} GPU for the server; the cluster has "
                f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free. Lower "
                "ray.client_cpus / ray.*_gpus or add nodes.") from None
        hosts = sorted({h for h, _ in where})
        log.info("Ray: %d actors on %s", len(where), ", ".join(hosts))

    def close(self, check: bool = True) -> None:
        """Stop the actors (and a Ray we started); with ``check``, first surface any
        failure not yet seen."""
        if not self.actors and not self._owns_ray:
            return
        try:
            if check:
                for proxy in self._proxies:
                    proxy.wait()
        finally:
            for actor in self.actors:
                self.ray.kill(actor)
            self.actors, self._proxies = [], []
            if self._owns_ray:
                self.ray.shutdown()
                self._owns_ray = False
