"""Rejoining through the real client process: a stream lost between forward and backward,
and a replayed hello that pushes a connected client off, both end in a finished run."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport.client import Link
from hsplitlora.transport.config import NetConfig
from tests.transport import harness
from tests.transport.conftest import peft_adapter, run_config


def _client_half(run_dir):
    full = peft_adapter(run_dir)
    return {k: v for k, v in full.items() if ".layers.0." in k or ".layers.1." in k}


def _assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert (a[k] - b[k]).abs().max() == 0, k


def test_a_client_whose_stream_drops_between_forward_and_backward_carries_on(
        tmp_path, tiny_llama_dir):
    # 40 short rounds and a 1 s back-off: the server is rounds further on when client 1,
    # which lost its stream in round 1 with a forward pass awaiting its gradient, returns.
    cfg = run_config(tiny_llama_dir, tmp_path, steps=40, agg_interval=2)
    net = NetConfig(port=0, step_timeout_s=20, join_timeout_s=60, rejoin_backoff_s=1.0)
    server, address = harness.serve_loopback(cfg, net, tmp_path)
    procs = [harness.start_client(cfg, net, i, address, tmp_path / f"client-{i}.safetensors",
                                  drop_at=1 if i == 1 else None) for i in range(3)]
    codes = harness.finish([server, *procs], 120)
    assert codes == [0, 0, 0, 0]
    records = harness.records(tmp_path / "net")
    rounds_of_1 = [r["round"] for r in records if "event" not in r and r["client"] == 1]
    assert rounds_of_1[:1] == [0] and 1 not in rounds_of_1 and 2 not in rounds_of_1
    assert rounds_of_1[-1] == 39  # back, and trained to the end
    final = _client_half(tmp_path / "net")
    for i in range(3):  # everyone, client 1 included, ends with the last aggregate
        _assert_same(load_file(tmp_path / f"client-{i}.safetensors"), final)


def test_a_replayed_hello_is_pushed_off_by_the_real_client_which_finishes(
        tmp_path, tiny_llama_dir):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("0: tok-zero\n1: tok-one\n2: tok-two\n")
    cfg = run_config(tiny_llama_dir, tmp_path, steps=6, agg_interval=2)
    net = NetConfig(port=0, step_timeout_s=20, join_timeout_s=60, rejoin_backoff_s=0.1,
                    tokens_file=tokens)
    server, address = harness.serve_loopback(cfg, net, tmp_path)
    procs = [harness.start_client(cfg, net, i, address, tmp_path / f"client-{i}.safetensors",
                                  token=t) for i, t in enumerate(["tok-zero", "tok-one",
                                                                   "tok-two"])]
    metrics = tmp_path / "net" / "metrics.jsonl"
    harness.wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
                     60, "the run to get going")
    hello = pb.Hello(client_id=0, cut=2, num_samples=20, codec="none", mode="splitlora")
    replay = Link(address, net, hello, "tok-zero")  # a captured token, replayed
    with pytest.raises(Exception, match="replaced by a newer connection"):
        replay.welcome(30)  # the server may welcome it before the real client is back
        while True:
            replay.receive(30)
    replay.close()
    codes = harness.finish([server, *procs], 120)
    assert codes == [0, 0, 0, 0]
    final = _client_half(tmp_path / "net")
    for i in range(3):
        _assert_same(load_file(tmp_path / f"client-{i}.safetensors"), final)
