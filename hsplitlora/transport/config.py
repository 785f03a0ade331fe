"""The ``net`` section of a run configuration: addresses, security, wire format, time limits.

One place for every deployment default; ``hsplitlora serve``, ``join`` and ``fedserver``
read the same section, so one config file describes the whole deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from hsplitlora.section import Section

__all__ = ["Codec", "NetConfig"]

Codec = Literal["none", "bf16", "fp16", "int8"]


class NetConfig(Section):
    host: str = Field("127.0.0.1", description="address the main server listens on; 0.0.0.0 "
                      "for every interface")
    port: int = Field(50051, ge=0, le=65535, description="main server port; 0 = any free port")
    fed_address: str | None = Field(
        None, description="HOST:PORT of a fed server started with `hsplitlora fedserver`; "
        "null = the fed server runs inside the main server's process, on its port")
    fed_port: int = Field(50052, ge=0, le=65535, description="port `hsplitlora fedserver` "
                          "listens on")
    tls_cert: Path | None = Field(None, description="server: PEM certificate chain; null = "
                                  "plaintext (loopback tests only)")
    tls_key: Path | None = Field(None, description="server: PEM private key of tls_cert")
    tls_ca: Path | None = Field(
        None, description="client: CA that signed the server certificate; server with "
        "mutual_tls: CA that signed the client certificates")
    mutual_tls: bool = Field(False, description="server: require a client certificate "
                             "signed by tls_ca")
    client_cert: Path | None = Field(None, description="client: PEM certificate for mutual TLS")
    client_key: Path | None = Field(None, description="client: PEM private key of client_cert")
    server_name: str | None = Field(None, description="client: host name the server "
                                    "certificate must carry, if not the address's host")
    tokens_file: Path | None = Field(
        None, description="server and fed server: YAML/JSON mapping client id -> secret "
        "token (and 'server' -> token for the main server's calls to a separate fed server); "
        "null = no token check")
    signed_tokens: bool = Field(
        False, description="sign every call with its party's token (HMAC over party, method, "
        "time and a nonce) instead of sending the token: a captured call cannot be replayed; "
        "for deployments without TLS. Server and clients must agree")
    token_window_s: float = Field(60.0, gt=0, description="with signed_tokens: how old a "
                                  "signature may be (the parties' clocks must agree to this)")
    codec: Codec = Field("none", description="activations and gradients on the wire: none "
                         "(exact), bf16, fp16, or int8 with per-channel scales")
    chunk_kb: int = Field(1024, ge=1, description="size of one frame of a tensor blob")
    max_message_mb: int = Field(16, ge=1, description="largest gRPC message accepted (the "
                                "4 MB gRPC default is raised to this); must exceed chunk_kb")
    max_tensor_mb: int | None = Field(
        None, ge=1, description="largest tensor blob (one upload, all chunks together) "
        "accepted; null = derived from the run: one batch of activations (main server; in the "
        "heterogeneous modes, or the widest adapter a plan allows if larger), one adapter "
        "(fed server), 2048 MB where nothing bounds it (what a client receives, uploads to "
        "a separate heterogeneous fed server)")
    max_activation: float | None = Field(
        None, gt=0, description="largest |value| of an activation or gradient accepted; "
        "null = derived from the model's hidden size (see WirePlan.value_bound)")
    step_timeout_s: float = Field(60.0, gt=0, description="a client whose activations (or "
                                  "adapter) are this late is dropped from the round")
    hello_timeout_s: float = Field(10.0, gt=0, description="a stream that sends no hello "
                                   "this long after it opens is closed")
    idle_timeout_s: float = Field(300.0, gt=0, description="a connection with no open call "
                                  "this long is closed")
    streams_per_party: int = Field(2, ge=1, description="open calls one party may hold per "
                                   "service (a reconnecting client briefly holds two)")
    peer_calls_per_s: float = Field(
        50.0, gt=0, description="new calls one network address may open per second (a "
        "token bucket; parties on one machine or behind one NAT share it); more are refused "
        "with RESOURCE_EXHAUSTED before anything is read, and clients retry after the wait "
        "the refusal names")
    peer_call_burst: int = Field(100, ge=1, description="new calls one address may open "
                                 "at once before net.peer_calls_per_s applies (the token "
                                 "bucket's size)")
    join_timeout_s: float = Field(120.0, gt=0, description="how long the server waits for "
                                  "clients before the first round (and after a resume)")
    reply_timeout_s: float = Field(600.0, gt=0, description="client: how long to wait for the "
                                   "server's answer before giving up on the connection")
    min_clients: int | None = Field(None, ge=1, description="clients needed to start (or "
                                    "resume) when the join timeout runs out; null = all")
    rejoin_attempts: int = Field(10, ge=0, description="client: reconnections tried after a "
                                 "lost connection before giving up")
    rejoin_backoff_s: float = Field(1.0, gt=0, description="client: first wait between "
                                    "reconnections; doubles each try, up to 30 s")

    @model_validator(mode="after")
    def _consistent(self) -> NetConfig:
        if self.chunk_kb * 1024 + 4096 > self.max_message_mb * 2**20:
            raise ValueError(f"net.chunk_kb ({self.chunk_kb}) does not fit in "
                             f"net.max_message_mb ({self.max_message_mb}); lower chunk_kb")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("net.tls_cert and net.tls_key go together: set both or neither")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("net.client_cert and net.client_key go together")
        if self.mutual_tls and (self.tls_cert is None or self.tls_ca is None):
            raise ValueError("net.mutual_tls needs net.tls_cert, net.tls_key and net.tls_ca "
                             "(the CA that signs client certificates)")
        return self

    @property
    def tls(self) -> bool:
        """Whether this deployment uses TLS (one config file serves every party, so a
        client also reads the server's certificate settings as "TLS is on")."""
        return self.tls_cert is not None or self.tls_ca is not None

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_kb * 1024

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 2**20

    @property
    def max_tensor_bytes(self) -> int:
        """The configured limit, or 2 GB where the receiver cannot derive one."""
        return (self.max_tensor_mb or 2048) * 2**20

    def tensor_limit(self, derived: int) -> int:
        """The configured limit, else ``derived`` (what the run's plan says one blob holds)."""
        return self.max_tensor_mb * 2**20 if self.max_tensor_mb is not None else derived
