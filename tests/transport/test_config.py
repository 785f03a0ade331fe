"""The net section: defaults that work on loopback, mistakes caught with a way out."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hsplitlora.transport.config import NetConfig


def test_defaults_raise_grpcs_receive_limit_and_keep_frames_below_it():
    net = NetConfig()
    assert net.max_message_bytes > 4 * 2**20  # gRPC's own default is 4 MB
    assert net.chunk_bytes < net.max_message_bytes < 2**31  # far below protobuf's 2 GB
    assert net.codec == "none" and not net.tls


@pytest.mark.parametrize(("fields", "message"), [
    ({"chunk_kb": 20_000, "max_message_mb": 16}, "chunk_kb .* does not fit"),
    ({"tls_cert": "cert.pem"}, "tls_cert and net.tls_key go together"),
    ({"client_cert": "c.pem"}, "client_cert and net.client_key go together"),
    ({"mutual_tls": True}, "mutual_tls needs net.tls_cert"),
    ({"codec": "zstd"}, "Input should be 'none', 'bf16', 'fp16' or 'int8'"),
    ({"rejoin_atempts": 3}, "Extra inputs are not permitted"),
    ({"peer_calls_per_s": 0}, "peer_calls_per_s\n  Input should be greater than 0"),
    ({"peer_call_burst": 0}, "peer_call_burst\n  Input should be greater than or equal to 1"),
])
def test_inconsistent_settings_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        NetConfig(**fields)


def test_a_client_reading_the_servers_settings_knows_tls_is_on(tmp_path):
    assert NetConfig(tls_ca=tmp_path / "ca.pem").tls
    assert NetConfig(tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem").tls
