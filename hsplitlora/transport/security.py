"""Channels and credentials: TLS (optionally mutual), per-party tokens, clear refusals.

Every call carries two metadata entries: ``x-hsplitlora-party`` (a client id, or
``server`` for the main server's calls to a separate fed server) and ``authorization:
Bearer <token>``. The receiver checks the token in constant time against its tokens file
and refuses an unknown party or a wrong token with ``UNAUTHENTICATED``; the caller turns
that, and the opaque errors gRPC gives for a TLS mismatch, into sentences that say what to
fix.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import yaml

from hsplitlora.transport.config import NetConfig

__all__ = ["AuthError", "Authenticator", "ConnectionFailed", "Refused", "bind",
           "call_metadata", "explain", "load_tokens", "open_channel", "options"]

log = logging.getLogger(__name__)

PARTY_KEY = "x-hsplitlora-party"
TOKEN_KEY = "authorization"


class AuthError(PermissionError):
    """The other side refused who we are (unknown party, wrong token, missing certificate)."""


class ConnectionFailed(ConnectionError):
    """The other side could not be reached or went away; trying again may help."""


class Refused(RuntimeError):
    """The other side refused a request for a reason that trying again will not fix."""


def _read(path: Path, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"net.{field}: cannot read {path}: {e.strerror}") from None


def load_tokens(path: Path) -> dict[str, str]:
    """``{party: token}`` from a YAML/JSON mapping (keys are client ids or ``server``)."""
    raw = yaml.safe_load(_read(path, "tokens_file"))
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v for v in raw.values()):
        raise ValueError(f"net.tokens_file {path}: expected a mapping of client id (or "
                         "'server') to a non-empty token string, e.g. {0: 5f3c..., 1: 9a1e...}")
    return {str(k): v for k, v in raw.items()}


def options(net: NetConfig) -> list[tuple[str, Any]]:
    """Message size limits (gRPC's 4 MB default is far below one activation of a real
    model) and keep-alives, so a dead peer is noticed without waiting for a timeout."""
    return [
        ("grpc.max_receive_message_length", net.max_message_bytes),
        ("grpc.max_send_message_length", net.max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_time_between_pings_ms", 10_000),
    ]


def bind(server: grpc.Server, address: str, net: NetConfig) -> int:
    """Listen on ``address`` (TLS when ``net.tls_cert`` is set); returns the bound port."""
    if net.tls_cert is None:
        if net.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("serving PLAINTEXT on %s: anyone on the network can read activations "
                        "and gradients; set net.tls_cert and net.tls_key", address)
        port = server.add_insecure_port(address)
    else:
        assert net.tls_key is not None
        creds = grpc.ssl_server_credentials(
            [(_read(net.tls_key, "tls_key"), _read(net.tls_cert, "tls_cert"))],
            root_certificates=_read(net.tls_ca, "tls_ca") if net.mutual_tls and net.tls_ca
            else None,
            require_client_auth=net.mutual_tls,
        )
        port = server.add_secure_port(address, creds)
    if port == 0:
        raise OSError(f"cannot listen on {address}: the port is taken or the address is not "
                      "this machine's; pick another net.port / net.host")
    return port


def open_channel(address: str, net: NetConfig) -> grpc.Channel:
    """A channel to ``address``, over TLS when the deployment uses it."""
    opts = options(net)
    # One connection per channel: parties in one process (tests, load benchmarks) must
    # not share a socket, or one party's fault would look like another's.
    opts.append(("grpc.use_local_subchannel_pool", 1))
    if not net.tls:
        return grpc.insecure_channel(address, options=opts)
    if net.server_name:
        opts.append(("grpc.ssl_target_name_override", net.server_name))
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(net.tls_ca, "tls_ca") if net.tls_ca else None,
        private_key=_read(net.client_key, "client_key") if net.client_key else None,
        certificate_chain=_read(net.client_cert, "client_cert") if net.client_cert else None,
    )
    return grpc.secure_channel(address, creds, options=opts)


def call_metadata(party: str, token: str | None) -> tuple[tuple[str, str], ...]:
    meta = [(PARTY_KEY, party)]
    if token:
        meta.append((TOKEN_KEY, f"Bearer {token}"))
    return tuple(meta)


class Authenticator:
    """Checks the party and token of an incoming call against the tokens file."""

    def __init__(self, tokens: Mapping[str, str] | None, parties: set[str]) -> None:
        self.tokens = dict(tokens) if tokens is not None else None
        self.parties = parties
        if tokens is None:
            log.warning("no net.tokens_file: any process that reaches this port may join as "
                        "any client; fine on loopback, not across machines")

    def identify(self, context: grpc.ServicerContext) -> str:
        """The caller's party name, or abort the call with a reason (and log it)."""
        meta = dict(context.invocation_metadata())
        party = str(meta.get(PARTY_KEY, ""))
        reason = None
        if party not in self.parties:
            reason = (f"unknown party {party!r}: this server expects "
                      f"{', '.join(sorted(self.parties))}")
        elif self.tokens is not None:
            given = str(meta.get(TOKEN_KEY, "")).removeprefix("Bearer ")
            expected = self.tokens.get(party)
            if expected is None:
                reason = f"party {party!r} has no token in the server's tokens file"
            elif not hmac.compare_digest(given.encode(), expected.encode()):
                reason = f"wrong token for party {party!r}"
        if reason is not None:
            log.warning("refused a call from %s: %s", context.peer(), reason)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        return party


def explain(err: grpc.RpcError, address: str, net: NetConfig) -> Exception:
    """A gRPC failure as an exception whose message says what to do."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(f"{address} refused us: {details}. Check the client id and the token "
                         "(the server's net.tokens_file must hold the same token)")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.RESOURCE_EXHAUSTED):
        return Refused(f"{address} refused the request: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = ("the server may use TLS: set net.tls_ca to the CA that signed its certificate"
                if not net.tls else
                "if the server is plaintext, remove the TLS settings; else check net.tls_ca "
                "(and, for mutual TLS, net.client_cert / net.client_key) and net.server_name")
        return ConnectionFailed(f"cannot talk to {address}: {details}. Is the server running "
                                f"and reachable? {hint}")
    return ConnectionFailed(f"call to {address} failed ({code}): {details}")
