"""Who may talk to the main server: tokens, TLS and mutual TLS, refusals on both sides."""

from __future__ import annotations

import logging

import pytest

from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.security import AuthError, ConnectionFailed
from tests.transport.certs import make_certs
from tests.transport.live import start_live

TOKENS = {"0": "token-of-client-0", "1": "token-of-client-1"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def token_server():
    live = start_live(NetConfig(step_timeout_s=1, join_timeout_s=2), tokens=TOKENS)
    yield live
    live.stop()


@pytest.mark.parametrize(("client_id", "token", "reason"), [
    (0, "not-the-token", "wrong token for party '0'"),
    (0, None, "wrong token for party '0'"),
    (1, TOKENS["0"], "wrong token for party '1'"),  # another client's token
    (7, "anything", "unknown party '7'"),
])
def test_bad_credentials_are_refused_and_logged_on_both_sides(token_server, caplog, client_id,
                                                              token, reason):
    caplog.set_level(logging.WARNING, logger="hsplitlora.transport.security")
    link = token_server.link(client_id, token=token)
    with pytest.raises(AuthError, match=reason) as err:
        link.welcome(5)
    assert "token" in str(err.value)  # the client's message says what to check
    link.close()
    logged = [r.getMessage() for r in caplog.records]
    assert any("refused a call from ipv4:127.0.0.1" in m and reason in m for m in logged)
    assert token_server.coordinator._pending == {}  # nobody got in


def test_a_flood_of_refused_calls_is_logged_once_per_address_and_party(token_server, caplog):
    caplog.set_level(logging.WARNING, logger="hsplitlora.transport.security")
    for client_id in (0, 0, 0, 0, 0, 7):
        link = token_server.link(client_id, token="wrong")
        with pytest.raises(AuthError):
            link.welcome(5)
        link.close()
    logged = [r.getMessage() for r in caplog.records if "refused a call" in r.getMessage()]
    assert len(logged) == 2, logged
    assert "wrong token for party '0'" in logged[0] and "logged once a minute" in logged[0]
    assert "unknown party '7'" in logged[1]


def test_the_right_token_is_admitted(token_server):
    links = [token_server.link(i, token=TOKENS[str(i)]) for i in (0, 1)]
    welcomes = [link.welcome(5) for link in links]
    assert [(w.round, w.steps, w.interval, w.cut) for w in welcomes] == [(0, 3, 3, 2)] * 2
    for link in links:
        link.close()


def _tls_server(certs, **extra):
    net = NetConfig(step_timeout_s=1, join_timeout_s=2, tls_cert=certs.server_cert,
                    tls_key=certs.server_key, tls_ca=certs.ca, **extra)
    return start_live(net, num_clients=1)


def test_plaintext_client_is_refused_by_a_tls_server(certs, capfd):
    live = _tls_server(certs)
    try:
        link = live.link(0, net=NetConfig())
        with pytest.raises(ConnectionFailed, match="server may use TLS: set net.tls_ca"):
            link.welcome(5)
        link.close()
        # gRPC's core logs the failed handshake on the server side (stderr), not Python.
        assert "WRONG_VERSION_NUMBER" in capfd.readouterr().err
        good = live.link(0, net=NetConfig(tls_ca=certs.ca))
        assert good.welcome(5).round == 0  # the same server admits a TLS client
        good.close()
    finally:
        live.stop()


def test_tls_client_that_does_not_trust_the_server_is_refused(certs, tmp_path):
    other = make_certs(tmp_path / "other")
    live = _tls_server(certs)
    try:
        link = live.link(0, net=NetConfig(tls_ca=other.ca))
        with pytest.raises(ConnectionFailed, match="check net.tls_ca"):
            link.welcome(5)
        link.close()
    finally:
        live.stop()


def test_mutual_tls_requires_a_client_certificate(certs):
    live = _tls_server(certs, mutual_tls=True)
    try:
        anonymous = live.link(0, net=NetConfig(tls_ca=certs.ca))
        with pytest.raises(ConnectionFailed):
            anonymous.welcome(5)
        anonymous.close()
        signed = live.link(0, net=NetConfig(tls_ca=certs.ca, client_cert=certs.client_cert,
                                            client_key=certs.client_key))
        assert signed.welcome(5).round == 0
        signed.close()
    finally:
        live.stop()


def test_a_client_certificate_serves_only_its_own_client_id(certs):
    """One CA-signed certificate (CN client-0) used to serve three ids: refused for the
    others, by name."""
    net = NetConfig(step_timeout_s=1, join_timeout_s=1, tls_cert=certs.server_cert,
                    tls_key=certs.server_key, tls_ca=certs.ca, mutual_tls=True, min_clients=1)
    live = start_live(net, num_clients=3)
    borrowed = NetConfig(tls_ca=certs.ca, client_cert=certs.client_cert,
                         client_key=certs.client_key)
    try:
        for cid in (1, 2):
            link = live.link(cid, net=borrowed)
            with pytest.raises(AuthError, match=f"the client certificate names client-0 but "
                                                f"the call says party '{cid}'"):
                link.welcome(5)
            link.close()
        own = live.link(0, net=borrowed)
        assert own.welcome(5).round == 0
        own.close()
        assert set(live.coordinator._pending) <= {0}
    finally:
        live.stop()


class _Context:
    """The little of a gRPC servicer context the authenticator reads."""

    def __init__(self, meta):
        self.meta, self.aborted = meta, None

    def invocation_metadata(self):
        return self.meta

    def peer(self):
        return "ipv4:127.0.0.1:1"

    def abort(self, code, reason):
        self.aborted = reason
        raise RuntimeError(reason)


def _check(auth, meta, method="Train"):
    ctx = _Context(meta)
    try:
        auth.identify(ctx, method)
    except RuntimeError:
        pass
    return ctx.aborted


def test_signed_tokens_refuse_replays_stale_calls_and_bearer_tokens(monkeypatch):
    from hsplitlora.transport import security
    from hsplitlora.transport.security import Authenticator, call_metadata

    net = NetConfig(signed_tokens=True, token_window_s=30)
    auth = Authenticator(TOKENS, {"0", "1"}, net)
    meta = call_metadata("0", TOKENS["0"], "Train", net)
    assert TOKENS["0"] not in str(meta)  # the token itself never travels
    assert _check(auth, meta) is None
    assert "a replayed call of party '0'" in _check(auth, meta)  # the same call again
    assert _check(auth, call_metadata("0", TOKENS["0"], "Train", net)) is None  # a fresh one
    assert "wrong token signature" in _check(auth, call_metadata("0", TOKENS["0"], "Open",
                                                                 net))  # for another method
    assert "wrong token signature" in _check(auth, call_metadata("0", TOKENS["1"], "Train",
                                                                 net))
    assert "sent no signed token" in _check(auth, call_metadata("0", TOKENS["0"], "Train"))
    now = security.time.time()
    monkeypatch.setattr(security.time, "time", lambda: now - 120)
    old = call_metadata("0", TOKENS["0"], "Train", net)
    monkeypatch.undo()
    assert "120 s old, beyond net.token_window_s=30" in _check(auth, old)


def test_signed_tokens_work_end_to_end():
    net = NetConfig(step_timeout_s=1, join_timeout_s=2, signed_tokens=True)
    live = start_live(net, tokens=TOKENS)
    try:
        links = [live.link(i, token=TOKENS[str(i)]) for i in (0, 1)]
        assert [link.welcome(5).round for link in links] == [0, 0]
        for link in links:
            link.close()
    finally:
        live.stop()
