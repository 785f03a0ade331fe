"""The main server over loopback: validation, compression, stalls and rejoins.

A reference MainServer, built from the same initial adapters, replays in-process exactly
the uploads the networked one accepted; equal adapters afterwards prove that refused
uploads changed nothing.
"""

from __future__ import annotations

import time

import pytest
import torch

from hsplitlora.models.lora import lora_state
from hsplitlora.transport import hsplitlora_pb2 as pb
from hsplitlora.transport.client import StepRefused
from hsplitlora.transport.codec import encode_activations
from hsplitlora.transport.config import NetConfig
from hsplitlora.transport.security import ConnectionFailed, Refused
from hsplitlora.transport.wire import pack
from tests.transport.live import MAX_LEN, activations, remote, serving


def _state(server):
    return lora_state(server.segments[0])


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _nan():
    acts = activations(0)
    acts.hidden[1, 4, 7] = float("nan")
    return acts


def _label(value):
    acts = activations(0)
    acts.labels[0, 5] = value
    return acts


def _mask():
    acts = activations(0)
    acts.attention_mask[1, 2] = 2
    return acts


MALFORMED = [
    (_nan(), "'hidden' holds 1 non-finite values"),
    (activations(0, seq=MAX_LEN + 1), r"dimension S = 17 is outside \[1, 16\] \(data.max_length\)"),
    (activations(0, batch=3), r"dimension B = 3 is outside \[1, 2\] \(train.batch_size\)"),
    (activations(0, hidden=torch.randn(2, 12, 31)), r"'hidden' has shape \(2, 12, 31\), expected "
                                                    r"\(2, 12, 32\)"),
    (activations(0, hidden=torch.randn(2, 12, 32, dtype=torch.float64)),
     "'hidden' has dtype F64, expected F32"),
    (_label(320), r"labels must be -100 or token ids in \[0, 320\); found 320"),
    (_mask(), "attention_mask must hold only 0 and 1"),
    (activations(0, seq=20_000), "exceeds the limit of 1048576 bytes"),
]


def test_malformed_uploads_are_refused_and_the_others_carry_on():
    steps = len(MALFORMED)
    with serving(NetConfig(step_timeout_s=10, join_timeout_s=10, max_tensor_mb=1),
                 steps=steps, interval=steps) as live:
        evil, honest = live.link(0), live.link(1)
        assert evil.welcome(5).round == honest.welcome(5).round == 0
        bad, good = remote(evil), remote(honest)
        for t, (acts, message) in enumerate(MALFORMED):
            before = _state(live.server)
            bad.round = good.round = t
            with pytest.raises(StepRefused, match=message) as refused:
                bad.step(0, acts)
            assert f"client 0, round {t}" in str(refused.value)
            # the server now waits for client 1: nothing may have moved
            assert _equal(_state(live.server), before)
            upload = activations(100 + t)
            reply = good.step(1, upload)
            expected = live.reference.step(1, upload)
            assert reply.loss == expected.loss and reply.tokens == expected.tokens
            assert torch.equal(reply.grad, expected.grad)
        # the last round aggregates client 1 alone: client 0 was refused in it
        adapter = lora_state(live.client_segment)
        merged = live.remote_fed(1).aggregate(steps - 1, adapter, 11)
        assert _equal(merged, adapter)
        for link in (evil, honest):
            done = link.receive(10)
            assert isinstance(done, pb.Control) and done.kind == pb.Control.DONE
        live.thread.join(10)
        assert not live.errors
        assert _equal(_state(live.server), _state(live.reference))


@pytest.mark.parametrize(("codec", "tolerance"), [("bf16", 2e-2), ("fp16", 2e-3), ("int8", 5e-2)])
def test_compressed_wire_formats_approximate_the_exact_step(codec, tolerance):
    with serving(NetConfig(step_timeout_s=10, join_timeout_s=10, codec=codec),
                 num_clients=1, steps=1) as live:
        link = live.link(0)
        link.welcome(5)
        upload = activations(7, seq=MAX_LEN, hidden=torch.randn(2, MAX_LEN, 32) * 3)
        proxy = remote(link, codec)
        reply = proxy.step(0, upload)
        exact = live.reference.step(0, upload)
        assert reply.loss != exact.loss  # the server trained on a lossy copy...
        assert abs(reply.loss - exact.loss) < tolerance * abs(exact.loss)  # ...a close one
        err = (reply.grad - exact.grad).norm() / exact.grad.norm()
        assert err < 4 * tolerance, err
        assert proxy.bytes_up < len(pack(encode_activations(upload, "none")))
        assert proxy.bytes_down < exact.grad.numel() * 4


def test_a_stalled_client_is_dropped_from_the_round_and_rejoins_later():
    with serving(NetConfig(step_timeout_s=1.0, join_timeout_s=10), steps=3, interval=3) as live:
        staller, steady = live.welcomed(0, 1)
        fast = remote(steady)
        fast.step(1, activations(1))  # served once the server gives up on client 0
        with pytest.raises(ConnectionFailed, match="no activations for round 0 within "
                                                   "net.step_timeout_s=1 s: dropped"):
            staller.receive(5)
        staller.close()
        back = live.link(0)  # rejoins while round 1 runs without it
        # Its Hello is handled on a server thread: wait (bounded) until the coordinator
        # holds it, so the rejoin is known before round 1 ends, however loaded the machine.
        deadline = time.monotonic() + 10
        while 0 not in live.coordinator._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 0 in live.coordinator._pending, "the rejoining client never reached the server"
        fast.round = 1
        fast.step(1, activations(3))
        assert back.welcome(5).round == 2  # admitted at the next round boundary
        slow = remote(back)
        slow.round = fast.round = 2
        slow.step(0, activations(4))
        fast.step(1, activations(5))
        for cid, seed in [(1, 1), (1, 3), (0, 4), (1, 5)]:
            live.reference.step(cid, activations(seed))
        assert _equal(_state(live.server), _state(live.reference))


def test_malformed_adapter_uploads_are_refused_by_the_fed_server():
    with serving(NetConfig(step_timeout_s=1, join_timeout_s=2)) as live:
        fed = live.remote_fed(0)
        good = lora_state(live.client_segment)
        key = next(iter(good))
        nan = {**good, key: torch.full_like(good[key], float("nan"))}
        with pytest.raises(Refused, match=f"tensor '{key}' holds .* non-finite values"):
            fed.aggregate(0, nan, 10)
        wrong = {**good, key: torch.zeros(3, 3)}
        with pytest.raises(Refused, match=rf"'{key}' has shape \(3, 3\)"):
            fed.aggregate(0, wrong, 10)
        extra = {**good, "model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)}
        with pytest.raises(Refused, match="unexpected .*up_proj"):
            fed.aggregate(0, extra, 10)
        with pytest.raises(Refused, match="aggregation round 0 was never opened"):
            fed.aggregate(0, good, 10)  # well formed, but no round is open
        fed.close()


def test_with_min_clients_the_run_starts_without_the_missing_after_the_join_timeout():
    with serving(NetConfig(step_timeout_s=5, join_timeout_s=0.5, min_clients=1), steps=1) as live:
        alone = live.link(1)
        assert alone.welcome(5).round == 0  # after 0.5 s of waiting for client 0
        reply = remote(alone).step(1, activations(9))
        assert reply.loss == live.reference.step(1, activations(9)).loss


def test_without_enough_clients_the_server_gives_up_with_a_reason():
    with serving(NetConfig(step_timeout_s=5, join_timeout_s=0.3)) as live:
        live.thread.join(5)
    assert len(live.errors) == 1 and isinstance(live.errors[0], TimeoutError)
    assert "only 0 of 2 clients connected within net.join_timeout_s=0.3 s" in str(live.errors[0])
