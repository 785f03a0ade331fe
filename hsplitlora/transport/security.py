"""Channels and credentials: TLS (optionally mutual), per-party tokens, clear refusals.

Every call carries ``x-hsplitlora-party`` (a client id, or ``server`` for the main
server's calls to a separate fed server) and, with a tokens file, ``authorization``:
either ``Bearer <token>`` (static: whoever captures it can replay it, so use it under
TLS) or, with ``net.signed_tokens``, ``HMAC <signature>`` over the party, the method, a
timestamp and a nonce, keyed by the token: the token never travels, a signature is good
for ``net.token_window_s`` and once only, so a captured call cannot be replayed. Under
mutual TLS the client certificate's CN or a SAN must name the party (``client-<id>`` or
``<id>``; ``server`` for the main server), so one certificate cannot serve other ids.
The receiver refuses an unknown party, a wrong token or signature, a replay or a
borrowed certificate with ``UNAUTHENTICATED``; the caller turns that, and the opaque
errors gRPC gives for a TLS mismatch, into sentences that say what to fix.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import yaml

from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.limits import RETRY_AFTER_KEY, Throttle, peer_address

__all__ = ["AuthError", "Authenticator", "ConnectionFailed", "Refused", "bind",
           "call_metadata", "certificate_names", "explain", "load_tokens", "open_channel",
           "options"]

log = logging.getLogger(__name__)

PARTY_KEY = "x-hsplitlora-party"
TOKEN_KEY = "authorization"
TIME_KEY = "x-hsplitlora-time"
NONCE_KEY = "x-hsplitlora-nonce"


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
        # Server side: a connection without calls is closed, and one connection carries
        # few streams (a client's link and its fed calls), so caps cannot be sidestepped.
        ("grpc.max_connection_idle_ms", int(net.idle_timeout_s * 1000)),
        ("grpc.max_concurrent_streams", 4 * net.streams_per_party),
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


def _signature(token: str, party: str, method: str, stamp: str, nonce: str) -> str:
    message = "\n".join((party, method, stamp, nonce)).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def call_metadata(party: str, token: str | None, method: str = "",
                  net: NetConfig | None = None) -> tuple[tuple[str, str], ...]:
    """The metadata of one call: a bearer token, or with ``net.signed_tokens`` a fresh
    signature of this call (``method``), so make it per call, never once per channel."""
    meta = [(PARTY_KEY, party)]
    if token and net is not None and net.signed_tokens:
        stamp, nonce = f"{time.time():.3f}", secrets.token_hex(16)
        meta += [(TIME_KEY, stamp), (NONCE_KEY, nonce),
                 (TOKEN_KEY, f"HMAC {_signature(token, party, method, stamp, nonce)}")]
    elif token:
        meta.append((TOKEN_KEY, f"Bearer {token}"))
    return tuple(meta)


def certificate_names(party: str) -> set[str]:
    """The names a party's client certificate may carry as CN or SAN."""
    return {party, f"client-{party}"} if party.isdigit() else {party}


class Authenticator:
    """Checks the party, its token (or signature) and, under mutual TLS, its certificate."""

    def __init__(self, tokens: Mapping[str, str] | None, parties: set[str],
                 net: NetConfig | None = None) -> None:
        self.tokens = dict(tokens) if tokens is not None else None
        self.parties = parties
        self.signed = net is not None and net.signed_tokens
        self.window_s = net.token_window_s if net is not None else 60.0
        self.mutual_tls = net is not None and net.mutual_tls
        self._seen: dict[str, float] = {}  # nonce -> when it may be forgotten
        self._log = Throttle(60.0)
        self._lock = threading.Lock()
        if tokens is None:
            log.warning("no net.tokens_file: any process that reaches this port may join as "
                        "any client; fine on loopback, not across machines")

    def identify(self, context: grpc.ServicerContext, method: str = "") -> str:
        """The caller's party name, or abort the call with a reason (and log it)."""
        meta = {k: v for k, v in context.invocation_metadata()}
        party = str(meta.get(PARTY_KEY, ""))
        reason = None
        if party not in self.parties:
            reason = (f"unknown party {party!r:.40}: this server expects "
                      f"{', '.join(sorted(self.parties))}")
        elif self.mutual_tls:
            reason = self._certificate_problem(context, party)
        if reason is None and party in self.parties and self.tokens is not None:
            reason = self._token_problem(meta, party, method)
        if reason is not None:
            address = peer_address(context.peer())
            if self._log.due((address, party)):  # a flood of refusals must not flood the log
                log.warning("refused a call from %s: %s (further refusals of this address "
                            "and party are logged once a minute)", context.peer(), reason)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        return party

    def _certificate_problem(self, context: grpc.ServicerContext, party: str) -> str | None:
        auth = context.auth_context()
        names = {n.decode(errors="replace") for key in ("x509_common_name",
                                                         "x509_subject_alternative_name")
                 for n in auth.get(key, [])}
        if names & certificate_names(party):
            return None
        return (f"the client certificate names {', '.join(sorted(names)) or 'nobody'} but the "
                f"call says party {party!r}; give each client its own certificate with CN or "
                f"SAN {sorted(certificate_names(party))[-1]!r}")

    def _token_problem(self, meta: Mapping[str, object], party: str, method: str) -> str | None:
        assert self.tokens is not None
        expected = self.tokens.get(party)
        if expected is None:
            return f"party {party!r} has no token in the server's tokens file"
        given = str(meta.get(TOKEN_KEY, ""))
        if not self.signed:
            if hmac.compare_digest(given.removeprefix("Bearer ").encode(), expected.encode()):
                return None
            return f"wrong token for party {party!r}"
        stamp, nonce = str(meta.get(TIME_KEY, "")), str(meta.get(NONCE_KEY, ""))
        try:
            age = abs(time.time() - float(stamp))
        except ValueError:
            return (f"party {party!r} sent no signed token (net.signed_tokens is on here: "
                    "turn it on for the client too)")
        if not given.startswith("HMAC ") or not hmac.compare_digest(
                given.removeprefix("HMAC ").encode(),
                _signature(expected, party, method, stamp, nonce).encode()):
            return f"wrong token signature for party {party!r}"
        if age > self.window_s:
            return (f"the signed token of party {party!r} is {age:.0f} s old, beyond "
                    f"net.token_window_s={self.window_s:g}: a replay, or the clocks differ")
        now = time.monotonic()
        with self._lock:
            for old in [k for k, t in self._seen.items() if t < now]:
                del self._seen[old]
            if nonce in self._seen:
                return f"a replayed call of party {party!r} (its signature was used before)"
            self._seen[nonce] = now + 2 * self.window_s
        return None


def _retry_after(err: grpc.RpcError) -> float | None:
    """The seconds a rate refusal asks the caller to wait (None: not a rate refusal)."""
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == RETRY_AFTER_KEY:
            try:
                return int(value) / 1000
            except (TypeError, ValueError):
                return None
    return None


def explain(err: grpc.RpcError, address: str, net: NetConfig) -> Exception:
    """A gRPC failure as an exception whose message says what to do."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(f"{address} refused us: {details}. Check the client id and the token "
                         "(the server's net.tokens_file must hold the same token)")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _retry_after(err) is not None:
        # Over the per-address call rate: waiting is the fix, so the caller retries.
        return ConnectionFailed(f"{address} is busy: {details}")
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
