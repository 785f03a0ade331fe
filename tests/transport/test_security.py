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
