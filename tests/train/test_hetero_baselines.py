"""The heterogeneous baselines as their papers define them, wired into a run, against hand
computations: HetLoRA's global adapter, truncation and rank self-pruning, FlexLoRA's exact
global update, and one optimizer policy for every aggregator."""

from __future__ import annotations

import pytest
import torch

from hsplitlora import aggregate as agg
from hsplitlora.config import RunConfig
from hsplitlora.models.lora import lora_parameters, tail_penalty
from hsplitlora.train.hetero import AGGREGATORS, PartyPlan, SelfPruning, run_hetero
from hsplitlora.train.recorder import Recorder
from hsplitlora.train.run import train
from tests.conftest import tiny_model
from tests.train.golden.runs import config_for
from tests.train.test_hetero import _system, _train_locally

Q = "model.layers.0.self_attn.q_proj"  # [32, 32] on the tiny Llama; client-side at cut 1
TWO = [PartyPlan(1, {Q: 2}), PartyPlan(1, {Q: 4})]
ALPHA = 8.0


def _set(system, cid: int, A: torch.Tensor, B: torch.Tensor) -> None:
    system.clients[cid].load_adapter_state({f"{Q}.lora_A.weight": A, f"{Q}.lora_B.weight": B})


def _known(seed: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, 32, generator=g), torch.randn(32, r, generator=g)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> None:
    """Equal to ``tol`` relative to the matrix's largest entry (fp32 rounding of products)."""
    err = float((got.double() - want.double()).abs().max())
    assert err <= tol * float(want.abs().max()), err


def _pair(system, cid: int) -> agg.LoraPair:
    return system.participant_states([cid])[0][Q]


def _hetlora_by_hand(states, p, sparsity=True):
    """HetLoRA's aggregation written out: sparsity weights p_k ||s_k B_k A_k||, both
    factors zero-padded to rank 4 (B at the first client's scale s_1) and averaged."""
    (A1, B1), (A2, B2) = states
    s1, s2 = ALPHA / A1.shape[0], ALPHA / A2.shape[0]
    n1, n2 = (float((s1 * B1 @ A1).norm()), float((s2 * B2 @ A2).norm())) if sparsity \
        else (1.0, 1.0)
    w1, w2 = p[0] * n1 / (p[0] * n1 + p[1] * n2), p[1] * n2 / (p[0] * n1 + p[1] * n2)
    pad_A = lambda A: torch.cat([A, torch.zeros(4 - A.shape[0], 32)])  # noqa: E731
    pad_B = lambda B: torch.cat([B, torch.zeros(32, 4 - B.shape[1])], 1)  # noqa: E731
    A = w1 * pad_A(A1) + w2 * pad_A(A2)
    B = w1 * pad_B(B1) + w2 * pad_B(B2 * (s2 / s1))
    return A, B, s1


def test_hetlora_participants_start_from_truncations_of_one_global_adapter():
    system = _system("zeropad", TWO)
    glob = system.global_model[Q]
    assert glob.rank == 4 and system.r_max == {Q: 4}
    assert float(glob.B.abs().max()) == 0
    for cid, r in enumerate((2, 4)):
        pair = _pair(system, cid)
        assert pair.rank == r
        assert torch.equal(pair.A, glob.A[:r]) and float(pair.B.abs().max()) == 0


@pytest.mark.parametrize("sparsity", [True, False])
def test_hetlora_aggregation_equals_a_hand_computation(sparsity):
    system = _system("zeropad", TWO, sparsity_weights=sparsity)
    known = [_known(1, 2), _known(2, 4)]
    for cid, (A, B) in enumerate(known):
        _set(system, cid, A, B)
    n = [c.num_samples for c in system.clients]
    p = [x / sum(n) for x in n]
    A, B, s = _hetlora_by_hand(known, p, sparsity)
    system.aggregate()
    glob = system.global_model[Q]
    assert glob.rank == 4
    _close(agg.delta(glob), s * B @ A)
    # the run's global model is the rank-4 global adapter, not a mix of truncations
    _close(system.global_update()[Q], s * B @ A)
    # each client continues from its first r ranks: (alpha / r) B_r A_r = s B[:, :r] A[:r]
    for cid, r in enumerate((2, 4)):
        got = _pair(system, cid)
        assert got.rank == r
        _close(got.A, A[:r])
        _close(got.B, B[:, :r] * s / (ALPHA / r))
        _close(agg.delta(got), s * B[:, :r] @ A[:r])


def test_tail_share_is_the_trailing_ranks_share_of_the_update():
    A, B = _known(3, 4)
    pair = agg.LoraPair(A, B, ALPHA)
    want = float((B[:, 3:] @ A[3:]).norm() / (B @ A).norm())
    assert agg.tail_share(pair, 3) == pytest.approx(want, rel=1e-6)
    zero = agg.LoraPair(A, torch.zeros_like(B), ALPHA)
    assert agg.tail_share(zero, 3) == 0.0 and agg.prune_tail(zero, 0.5, 0.9) is zero


def test_hetlora_self_pruning_drops_exactly_the_tails_below_the_threshold():
    # gamma 0.5: rank 2 may drop to 1, rank 4 to 2. Client 1's tail is tiny (pruned),
    # client 0's is as large as its head (kept).
    system = _system("zeropad", TWO, pruning=SelfPruning(gamma=0.5, threshold=0.1))
    A0, B0 = _known(1, 2)
    A1, B1 = _known(2, 4)
    B1[:, 2:] *= 1e-3
    for cid, (A, B) in enumerate([(A0, B0), (A1, B1)]):
        _set(system, cid, A, B)
    share = [agg.tail_share(agg.LoraPair(A0, B0, ALPHA), 1),
             agg.tail_share(agg.LoraPair(A1, B1, ALPHA), 2)]
    assert share[0] >= 0.1 > share[1]
    system.aggregate()
    assert [plan.ranks[Q] for plan in system.plans] == [2, 2]
    assert system.client_layout(1)[f"{Q}.lora_A.weight"] == (2, 32)
    # by hand: client 1 uploads its first two ranks, B rescaled so its update is unchanged
    # ((alpha/2) B' A' = (alpha/4) B[:, :2] A[:2]); the global adapter stays at rank 4
    n = [c.num_samples for c in system.clients]
    A, B, s = _hetlora_by_hand([(A0, B0), (A1[:2], B1[:, :2] * 0.5)], [x / sum(n) for x in n])
    glob = system.global_model[Q]
    assert glob.rank == 4 and float(glob.A[2:].abs().max()) == 0
    _close(agg.delta(glob), s * B @ A)
    for cid in (0, 1):
        _close(agg.delta(_pair(system, cid)), s * B[:, :2] @ A[:2])


def test_self_pruning_in_a_run_lowers_the_plans_and_records_a_replan():
    # any trained tail goes
    system = _system("zeropad", TWO, pruning=SelfPruning(gamma=0.5, threshold=0.999))
    rec = Recorder(None, 4, show_progress=False)
    run_hetero(system, steps=4, interval=2, rec=rec)
    replans = [r for r in rec.records if r.get("event") == "replan"]
    assert [r["round"] for r in replans] == [1, 3]  # the aggregations after steps 2 and 4
    assert [p["ranks"][Q] for p in replans[0]["plans"]] == [1, 2]
    assert [p["ranks"][Q] for p in replans[1]["plans"]] == [1, 1]
    assert replans[-1]["plans"] == [{"cut": p.cut, "ranks": dict(p.ranks)}
                                    for p in system.plans]
    assert [_pair(system, cid).rank for cid in (0, 1)] == [1, 1]
    assert system.global_model[Q].rank == 4  # r_max stays
    # a client uploads what it holds before this aggregation prunes it: ranks 1 and 2
    # (from the first prune) on [32, 32] in fp32; it downloads its pruned rank 1
    aggs = [r for r in rec.records if r.get("event") == "aggregate"]
    assert [up for _, up, _ in aggs[1]["links"]] == [1 * 2 * 32 * 4, 2 * 2 * 32 * 4]
    assert [down for _, _, down in aggs[1]["links"]] == [1 * 2 * 32 * 4, 1 * 2 * 32 * 4]


def test_flexlora_global_model_is_the_exact_weighted_update_and_clients_get_its_svd():
    system = _system("svd", TWO)
    known = [_known(1, 2), _known(2, 4)]
    for cid, (A, B) in enumerate(known):
        _set(system, cid, A, B)
    n = [c.num_samples for c in system.clients]
    exact = sum((nk / sum(n)) * (ALPHA / A.shape[0]) * B @ A
                for nk, (A, B) in zip(n, known, strict=True))
    system.aggregate()
    _close(system.global_update()[Q], exact)
    U, S, Vh = torch.linalg.svd(exact.double())
    for cid, r in enumerate((2, 4)):
        got = _pair(system, cid)
        assert got.rank == r
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        _close(agg.delta(got), best, 1e-5)


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_every_aggregator_leaves_the_optimizer_state_the_same_way(aggregator):
    # fresh AdamW moments for every participant after an aggregation, the LR schedule
    # going on where it was
    plans = [PartyPlan(1, {Q: 2, "model.layers.2.self_attn.v_proj": 2})] * 2 \
        if aggregator == "fedavg" else TWO + [PartyPlan(2, {Q: 2})]
    system = _system(aggregator, plans)
    _train_locally(system, 2)
    optimizers = [c.optimizer for c in system.clients] + list(system.server.optimizers.values())
    assert all(o.opt is None or o.opt.state for o in optimizers)
    system.aggregate()
    optimizers = [c.optimizer for c in system.clients] + list(system.server.optimizers.values())
    assert all(o.opt is None or not o.opt.state for o in optimizers)
    assert all(o.steps_done == 2 for o in optimizers if o.opt is not None)


def test_hetlora_with_a_separate_fed_server_is_refused_with_the_reason():
    from hsplitlora.train.placement import InProcess

    class WithFedServer(InProcess):
        def fed_aggregation(self):
            return object()

    with pytest.raises(ValueError, match="separate fed server"):
        _system("zeropad", TWO, place=WithFedServer(torch.device("cpu")))


def test_hetlora_regulariser_pushes_exactly_the_trailing_ranks():
    # d/dB_tail of lam ||B_tail|| ||A_tail|| = lam ||A_tail|| B_tail / ||B_tail||, and
    # symmetrically for A_tail; the kept ranks get nothing
    system = _system("zeropad", TWO)
    A, B = _known(4, 4)
    _set(system, 1, A, B)
    segment = system.clients[1].segment
    for p in lora_parameters(segment):
        p.grad = None
    tail_penalty(segment, gamma=0.5, lam=2.0)
    grads = {n.split(".lora_")[1][0]: p.grad for n, p in segment.named_parameters()
             if ".lora_" in n}
    a, b = A[2:].norm(), B[:, 2:].norm()
    _close(grads["B"][:, 2:], 2.0 * a * B[:, 2:] / b)
    _close(grads["A"][2:], 2.0 * b * A[2:] / a)
    assert float(grads["B"][:, :2].abs().max()) == 0 and float(grads["A"][:2].abs().max()) == 0


@pytest.mark.parametrize("lam,prunes", [(0.0, False), (50.0, True)])
def test_the_regulariser_is_what_makes_a_short_hetlora_run_prune(tiny_tokenizer, lam, prunes):
    # the golden hetlora run, tails worth under 20 % of an update pruned: left to
    # training the tails never get that small in 4 steps; the regulariser shrinks them
    raw = config_for("hetlora").model_dump(mode="json")
    raw["hetero"].update(prune_gamma=0.5, prune_lambda=lam, prune_threshold=0.2)
    result = train(RunConfig.model_validate(raw), model=tiny_model("llama"),
                   tokenizer=tiny_tokenizer, write=False, show_progress=False)
    pruned = [r for r in result.records
              if r.get("event") == "replan" and r.get("reason") == "self-pruning"]
    assert bool(pruned) == prunes
