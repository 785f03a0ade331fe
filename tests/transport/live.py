"""A main server on loopback inside the test process, for tests that poke at it directly.

The roles are real (a tiny Llama cut at block 2, a MainServer, a FedService) and so is the
network (gRPC on 127.0.0.1); what runs in the test's own threads is only the coordinator,
so a test can read the server's adapters between two clients' uploads.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from hsplitlora.models.lora import LoraSettings, attach_lora, lora_state
from hsplitlora.models.split import ClientSegment, split_model
from hsplitlora.roles.fedserver import FedServer
from hsplitlora.roles.messages import Activations
from hsplitlora.roles.server import MainServer
from hsplitlora.runtime.optim import OptimSettings
from hsplitlora.train.recorder import Recorder
from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport.client import Link, RemoteMainServer
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.fed import FedService, RemoteFed, adapter_layout, round_timeout
from hsplitlora.transport.plan import WirePlan
from hsplitlora.transport.server import Coordinator, listen
from tests.conftest import tiny_model

BATCH, MAX_LEN, HIDDEN, VOCAB = 2, 16, 32, 320


@dataclass
class Live:
    net: NetConfig
    port: int
    server: MainServer
    reference: MainServer  # an untouched copy, to replay the accepted steps in-process
    client_segment: ClientSegment
    fed: FedService
    coordinator: Coordinator
    grpc_server: grpc.Server
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def link(self, client_id: int, net: NetConfig | None = None, token: str | None = None,
             codec: str | None = None) -> Link:
        net = net or self.net
        hello = pb.Hello(client_id=client_id, cut=2, num_samples=10 + client_id,
                         codec=codec or net.codec, mode="splitlora")
        return Link(self.address, net, hello, token)

    def welcomed(self, *client_ids: int) -> list[Link]:
        """Links for ``client_ids``, each welcomed; all hellos go out before the first
        welcome is awaited, since the run starts only once enough clients joined."""
        links = [self.link(i) for i in client_ids]
        for link in links:
            link.welcome(5)
        return links

    def remote_fed(self, client_id: int, token: str | None = None) -> RemoteFed:
        return RemoteFed(self.address, self.net, str(client_id), token)

    def stop(self) -> None:
        self.grpc_server.stop(0)
        self.thread.join(10)


def start_live(net: NetConfig, *, num_clients: int = 2, steps: int = 3, interval: int = 3,
               tokens: dict[str, str] | None = None, bind_to: str = "127.0.0.1:0") -> Live:
    model = tiny_model("llama")
    torch.manual_seed(0)
    attach_lora(model, LoraSettings(r=4, alpha=8))
    client_seg, server_seg = split_model(model, 2)
    optim = OptimSettings(lr=5e-3, total_steps=steps * num_clients)
    server = MainServer(server_seg, range(num_clients), optim, precision="fp32")
    reference = MainServer(copy.deepcopy(server_seg), range(num_clients), optim, precision="fp32")
    # client i's shard holds 10 + i samples (what Live.link's hellos claim)
    samples = tuple(10 + i for i in range(num_clients))
    plan = WirePlan("splitlora", steps, interval, 2, num_clients, BATCH, MAX_LEN, HIDDEN, VOCAB,
                torch.float32, samples)
    fed = FedService(FedServer(alpha=8), adapter_layout(lora_state(client_seg)),
                     net.step_timeout_s, open_timeout_s=round_timeout(net, num_clients),
                     samples=samples, bound=plan.value_bound(net.max_activation))
    rec = Recorder(None, steps, show_progress=False)
    coordinator = Coordinator(server, plan, net, fed, rec)
    grpc_server, port = listen(coordinator, net, tokens, address=bind_to)
    live = Live(net, port, server, reference, client_seg, fed, coordinator, grpc_server,
                threading.Thread(target=lambda: None))

    def run() -> None:
        try:
            coordinator.run()
        except BaseException as e:  # surfaced by the test, not lost in a thread
            live.errors.append(e)

    live.thread = threading.Thread(target=run, daemon=True)
    live.thread.start()
    return live


@contextmanager
def serving(net: NetConfig, **kwargs: Any) -> Iterator[Live]:
    """``start_live(net, **kwargs)``, stopped when the block ends, however it ends."""
    live = start_live(net, **kwargs)
    try:
        yield live
    finally:
        live.stop()


def activations(seed: int, batch: int = BATCH, seq: int = 12, **changes: Any) -> Activations:
    """A well-formed upload (random hidden states; the server need not know their origin)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, HIDDEN, generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels[:, :3] = -100
    fields = {"hidden": hidden, "attention_mask": mask, "labels": labels, **changes}
    return Activations(**fields)


def remote(link: Link, codec: str = "none") -> RemoteMainServer:
    return RemoteMainServer(link, codec, 30.0)
