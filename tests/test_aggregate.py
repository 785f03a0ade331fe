"""Tests for hsplitlora.aggregate: exactness, fixed points, Eckart-Young and clear errors."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from hsplitlora import aggregate as agg
from hsplitlora.aggregate import (
    Factors,
    LoraPair,
    delta,
    dense_or_factors,
    fedavg,
    from_peft_state_dict,
    merge_update,
    noisefree,
    normalise_weights,
    peft_adapter_name,
    prune_regulariser,
    self_prune,
    stack,
    svd,
    to_peft_state_dict,
    weighted_delta,
    zeropad,
)

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
FAST = settings(max_examples=40, deadline=None)


def _pair(
    gen: torch.Generator,
    rank: int,
    shape: tuple[int, int] = (10, 12),
    alpha: float = 8.0,
    dtype: torch.dtype = torch.float64,
) -> LoraPair:
    d, n = shape
    return LoraPair(
        A=torch.randn(rank, n, generator=gen, dtype=dtype),
        B=torch.randn(d, rank, generator=gen, dtype=dtype),
        alpha=alpha,
    )


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def _hetero_states(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[dict[str, LoraPair]]:
    """Three clients with different ranks and alphas; client 2 does not adapt v_proj."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {Q: _pair(gen, 2, alpha=4.0, dtype=dtype), V: _pair(gen, 2, (6, 12), 4.0, dtype)},
        {Q: _pair(gen, 4, alpha=16.0, dtype=dtype), V: _pair(gen, 5, (6, 12), 10.0, dtype)},
        {Q: _pair(gen, 3, alpha=3.0, dtype=dtype)},
    ]


@st.composite
def _client_mix(draw: st.DrawFn) -> tuple[list[dict[str, LoraPair]], list[float]]:
    """1-4 clients, two modules of random shapes, random ranks, alphas and module subsets."""
    n_clients = draw(st.integers(1, 4))
    shapes = {m: (draw(st.integers(1, 9)), draw(st.integers(1, 9))) for m in (Q, V)}
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    states: list[dict[str, LoraPair]] = [{} for _ in range(n_clients)]
    for module, shape in shapes.items():
        holders = draw(st.sets(st.integers(0, n_clients - 1), min_size=1))
        for k in holders:
            rank = draw(st.integers(1, 6))
            alpha = draw(st.sampled_from([1.0, 2.0, 8.0, 16.5, 32.0]))
            states[k][module] = _pair(gen, rank, shape, alpha)
    weights = draw(st.lists(st.floats(0.1, 10.0), min_size=n_clients, max_size=n_clients))
    return states, weights


# ---------------------------------------------------------------------------------------------
# data model and peft keys


def test_lora_pair_properties_and_delta() -> None:
    pair = _pair(torch.Generator().manual_seed(1), rank=4, shape=(6, 5), alpha=8.0)
    assert (pair.rank, pair.scale, pair.shape) == (4, 2.0, (6, 5))
    assert_close(delta(pair), 2.0 * pair.B @ pair.A)


@pytest.mark.parametrize(
    ("A", "B", "alpha", "message"),
    [
        (torch.zeros(2, 5), torch.zeros(6, 3), 1.0, "A (2, 5) has 2 rows but B (6, 3) has 3"),
        (torch.zeros(2, 5, 1), torch.zeros(6, 2), 1.0, "2-D factors"),
        (torch.zeros(0, 5), torch.zeros(6, 0), 1.0, "rank >= 1"),
        (torch.zeros(2, 5), torch.zeros(6, 2, dtype=torch.float64), 1.0, "share dtype"),
        (torch.zeros(2, 5), torch.zeros(6, 2), 0.0, "alpha must be a finite number > 0"),
    ],
)
def test_lora_pair_rejects_malformed_factors(
    A: torch.Tensor, B: torch.Tensor, alpha: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LoraPair(A=A, B=B, alpha=alpha)


@pytest.mark.parametrize("adapter_name", [None, "default", "client_3"])
def test_peft_state_dict_round_trip_preserves_keys_and_adapter_name(
    adapter_name: str | None,
) -> None:
    state = _hetero_states()[1]
    flat = to_peft_state_dict(state, adapter_name=adapter_name)
    infix = "" if adapter_name is None else f".{adapter_name}"
    assert set(flat) == {f"{m}.lora_{f}{infix}.weight" for m in (Q, V) for f in "AB"}
    assert peft_adapter_name(flat) == adapter_name
    back = from_peft_state_dict(flat, {Q: 16.0, V: 10.0}, adapter_name=adapter_name)
    assert list(back) == list(state)
    for module, pair in state.items():
        assert back[module].A is pair.A and back[module].B is pair.B
        assert back[module].alpha == pair.alpha
    assert to_peft_state_dict(back, adapter_name=adapter_name).keys() == flat.keys()


def test_peft_pairs_are_matched_by_name_not_shape() -> None:
    # Two square modules of the same shape, given in an order that pairs wrongly by position.
    a1, b1, a2, b2 = (torch.full((3, 3), float(i)) for i in range(4))
    flat = {
        f"{Q}.lora_A.weight": a1,
        f"{V}.lora_B.weight": b2,
        f"{V}.lora_A.weight": a2,
        f"{Q}.lora_B.weight": b1,
    }
    state = from_peft_state_dict(flat, 3.0)
    assert state[Q].A is a1 and state[Q].B is b1 and state[V].A is a2 and state[V].B is b2


def test_peft_state_dict_errors_name_the_problem() -> None:
    a, b = torch.zeros(2, 4), torch.zeros(5, 2)
    with pytest.raises(ValueError, match=rf"module '{Q}' has '{Q}.lora_A.weight' but no "):
        from_peft_state_dict({f"{Q}.lora_A.weight": a}, 1.0)
    with pytest.raises(ValueError, match=rf"'{Q}.lora_B.default.weight' but no '{Q}.lora_A"):
        from_peft_state_dict({f"{Q}.lora_B.default.weight": b}, 1.0, adapter_name="default")
    with pytest.raises(ValueError, match="'transformer.wte.weight' is not a LoRA factor key"):
        from_peft_state_dict({"transformer.wte.weight": a}, 1.0)
    with pytest.raises(ValueError, match="belongs to adapter 'default', but adapter_name=None"):
        from_peft_state_dict({f"{Q}.lora_A.default.weight": a}, 1.0)
    with pytest.raises(ValueError, match=rf"no alpha given for module '{Q}'"):
        from_peft_state_dict({f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": b}, {V: 1.0})
    with pytest.raises(ValueError, match=rf"module '{Q}': LoraPair rank mismatch"):
        from_peft_state_dict({f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": b.T}, 1.0)
    mixed = {f"{Q}.lora_A.default.weight": a, f"{V}.lora_A.other.weight": a}
    with pytest.raises(ValueError, match="mixes LoRA adapters 'default', 'other'"):
        peft_adapter_name(mixed)
    with pytest.raises(ValueError, match="adapter_name must be a non-empty name without dots"):
        to_peft_state_dict({}, adapter_name="a.b")


def test_conventions_match_peft_merge_for_linear_and_gpt2_conv1d() -> None:
    """Our pair layout, alpha/r scale and fan_in_fan_out transpose are peft's own."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    )
    linear = torch.nn.Sequential(torch.nn.Linear(12, 10))
    cases = [(gpt2, "c_attn", True), (linear, "0", False)]
    for model, target, fan_in_fan_out in cases:
        config = peft.LoraConfig(
            r=3, lora_alpha=7, target_modules=[target], fan_in_fan_out=fan_in_fan_out
        )
        peft_model = peft.get_peft_model(model, config)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; make the update visible
                torch.nn.init.normal_(param)
        flat = peft.get_peft_model_state_dict(peft_model)
        state = from_peft_state_dict(flat, 7.0)
        (module,) = state
        base = peft_model.get_submodule(module).base_layer.weight.detach().clone()
        ours = merge_update(base, noisefree([state], [1.0])[module], fan_in_fan_out)
        merged = peft_model.merge_and_unload()
        assert_close(ours, merged.get_submodule(module.removeprefix("base_model.model.")).weight)


# ---------------------------------------------------------------------------------------------
# weights


def test_weights_are_normalised_and_validated() -> None:
    assert normalise_weights([1, 3]) == [0.25, 0.75]
    with pytest.raises(ValueError, match=r"weights\[1\] = -1.0; .* must be finite and >= 0"):
        normalise_weights([1, -1])
    with pytest.raises(ValueError, match=r"weights\[0\] = nan"):
        normalise_weights([float("nan"), 1])
    with pytest.raises(ValueError, match="are all zero; at least one client needs a positive"):
        normalise_weights([0, 0])
    with pytest.raises(ValueError, match="got 1 weights for 2 client states"):
        fedavg(_hetero_states()[:2], [1.0])


def test_module_held_only_by_zero_weight_clients_is_an_error() -> None:
    states = _hetero_states()
    with pytest.raises(ValueError, match=rf"module '{V}' is held only by clients \[0, 1\]"):
        noisefree(states, [0.0, 0.0, 1.0])


# ---------------------------------------------------------------------------------------------
# exact methods


@FAST
@given(_client_mix())
def test_noisefree_and_stack_reproduce_weighted_delta_fp64(
    mix: tuple[list[dict[str, LoraPair]], list[float]],
) -> None:
    states, weights = mix
    for renormalise in (True, False):
        ref = weighted_delta(states, weights, renormalise=renormalise)
        factors = noisefree(states, weights, renormalise=renormalise)
        stacked = stack(states, weights, renormalise=renormalise)
        assert list(factors) == list(ref) == list(stacked)
        for module, expected in ref.items():
            U, V_ = factors[module]
            ranks = sum(s[module].rank for s in states if module in s)
            assert U.shape == (expected.shape[0], ranks) and V_.shape == (ranks, expected.shape[1])
            tol = 1e-10 * max(float(expected.norm()), 1.0)
            assert_close(U @ V_, expected, rtol=0, atol=tol)
            assert stacked[module].scale == 1.0
            assert_close(delta(stacked[module]), expected, rtol=0, atol=tol)


def test_noisefree_and_stack_are_exact_in_fp32() -> None:
    states = _hetero_states(seed=3, dtype=torch.float32)
    ref64 = weighted_delta(
        [{m: LoraPair(p.A.double(), p.B.double(), p.alpha) for m, p in s.items()} for s in states],
        [2, 1, 5],
    )
    for module, (U, V_) in noisefree(states, [2, 1, 5]).items():
        assert U.dtype == torch.float32
        assert _rel((U @ V_).double(), ref64[module]) < 1e-5
        assert _rel(delta(stack(states, [2, 1, 5])[module]).double(), ref64[module]) < 1e-5


def test_renormalise_decides_between_average_and_sum_over_holders() -> None:
    states = _hetero_states()
    p = normalise_weights([1, 1, 2])  # client 2 (weight 0.5) has no v_proj
    holders = [states[0][V], states[1][V]]
    summed = sum(w * delta(pair) for w, pair in zip(p[:2], holders, strict=True))
    averaged = sum(0.5 * delta(pair) for pair in holders)
    U, V_ = noisefree(states, [1, 1, 2], renormalise=False)[V]
    assert_close(U @ V_, summed)
    U, V_ = noisefree(states, [1, 1, 2], renormalise=True)[V]
    assert_close(U @ V_, averaged)


def test_stack_leaves_out_zero_weight_clients() -> None:
    states = _hetero_states()
    pair = stack(states, [1.0, 0.0, 1.0])[Q]
    assert pair.rank == 2 + 3 and pair.alpha == 5.0
    assert_close(delta(pair), weighted_delta(states, [1.0, 0.0, 1.0])[Q])


def test_merge_update_and_dense_or_factors() -> None:
    gen = torch.Generator().manual_seed(4)
    factors = Factors(U=torch.randn(6, 2, generator=gen), V=torch.randn(2, 4, generator=gen))
    weight = torch.randn(6, 4, generator=gen)
    before = weight.clone()
    assert_close(merge_update(weight, factors), weight + factors.U @ factors.V)
    assert torch.equal(weight, before)
    conv1d = weight.T.contiguous()  # GPT-2 Conv1D stores [n_in, d_out]
    assert_close(
        merge_update(conv1d, factors, fan_in_fan_out=True), (weight + factors.U @ factors.V).T
    )
    with pytest.raises(ValueError, match="the transpose fits, so set fan_in_fan_out=True"):
        merge_update(conv1d, factors)
    half = merge_update(weight.half(), factors)
    assert half.dtype == torch.float16
    # rank 2 of a 6 x 4 update: 2 * 10 = 20 numbers < 24 dense, so factors travel
    assert dense_or_factors(factors) is factors
    wide = Factors(U=torch.randn(6, 4, generator=gen), V=torch.randn(4, 4, generator=gen))
    dense = dense_or_factors(wide)  # 4 * 10 = 40 > 24: dense is smaller
    assert isinstance(dense, torch.Tensor) and dense.shape == (6, 4)
    assert_close(merge_update(weight, dense), merge_update(weight, wide))


# ---------------------------------------------------------------------------------------------
# inexact methods: they must be measurably off when clients differ


def test_fedavg_and_zeropad_do_not_reproduce_weighted_delta(capsys: pytest.CaptureFixture) -> None:
    gen = torch.Generator().manual_seed(5)
    same_rank = [{Q: _pair(gen, 4)} for _ in range(3)]
    weights = [1.0, 2.0, 3.0]
    ref = weighted_delta(same_rank, weights)[Q]
    fedavg_error = _rel(delta(fedavg(same_rank, weights)[Q]), ref)

    hetero = _hetero_states(seed=5)
    ref = weighted_delta(hetero, weights)[Q]
    # give every client the full padded rank so the error is the cross terms, not truncation
    padded = zeropad(hetero, weights, ranks_out=[4, 4, 4], norm_weighted=False)
    zeropad_error = _rel(delta(padded[0][Q]), ref)
    exact_error = _rel(delta(stack(hetero, weights)[Q]), ref)
    with capsys.disabled():
        print(
            f"\nrelative error vs weighted_delta: fedavg {fedavg_error:.3f}, "
            f"zeropad {zeropad_error:.3f}, stack {exact_error:.1e}"
        )
    assert fedavg_error > 0.3
    assert zeropad_error > 0.3
    assert exact_error < 1e-12


# ---------------------------------------------------------------------------------------------
# fixed point: clients that agree get their adapter back


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_identical_clients_come_back_unchanged(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    state = {Q: _pair(gen, 4, alpha=16.0, dtype=dtype), V: _pair(gen, 3, (6, 12), 5.0, dtype)}
    states = [state, dict(state), dict(state)]
    weights = [1.0, 3.0, 2.0]
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    avg = fedavg(states, weights)
    for out in [avg, *zeropad(states, weights)]:
        for module, pair in state.items():
            assert out[module].alpha == pair.alpha
            assert_close(out[module].A, pair.A, rtol=0.0, atol=0.0)
            assert_close(out[module].B, pair.B, rtol=0.0, atol=0.0)
    outs, _ = svd(states, weights)
    for out in outs:
        for module, pair in state.items():
            assert out[module].rank == pair.rank and out[module].alpha == pair.alpha
            assert _rel(delta(out[module]).double(), delta(pair).double()) < tol
    for module, pair in state.items():
        U, V_ = noisefree(states, weights)[module]
        assert _rel((U @ V_).double(), delta(pair).double()) < tol
        assert _rel(delta(stack(states, weights)[module]).double(), delta(pair).double()) < tol


# ---------------------------------------------------------------------------------------------
# fedavg


def test_fedavg_weights_follow_sample_counts() -> None:
    gen = torch.Generator().manual_seed(7)
    p1, p2 = _pair(gen, 4), _pair(gen, 4)
    out = fedavg([{Q: p1}, {Q: p2}], [1, 3])[Q]
    assert_close(out.A, 0.25 * p1.A + 0.75 * p2.A)
    assert_close(out.B, 0.25 * p1.B + 0.75 * p2.B)


def test_fedavg_errors_name_module_and_mismatch() -> None:
    gen = torch.Generator().manual_seed(8)
    with pytest.raises(ValueError, match=rf"module '{Q}' has ranks \[4, 8\]"):
        fedavg([{Q: _pair(gen, 4)}, {Q: _pair(gen, 8)}], [1, 1])
    with pytest.raises(ValueError, match=rf"module '{Q}' has alphas \[8.0, 16.0\]"):
        fedavg([{Q: _pair(gen, 4)}, {Q: _pair(gen, 4, alpha=16.0)}], [1, 1])
    with pytest.raises(ValueError, match=rf"client 1 lacks \['{V}'\] and has extra \[\]"):
        fedavg([{Q: _pair(gen, 4), V: _pair(gen, 4)}, {Q: _pair(gen, 4)}], [1, 1])


@pytest.mark.parametrize("method", [fedavg, zeropad, stack, noisefree, weighted_delta])
def test_shape_mismatch_across_clients_is_an_error(method) -> None:
    gen = torch.Generator().manual_seed(9)
    states = [{Q: _pair(gen, 4, (10, 12))}, {Q: _pair(gen, 4, (10, 16))}]
    with pytest.raises(
        ValueError,
        match=r"client 0 has \[d_out, n_in\] = \[10, 12\], client 1 "
        r"has \[10, 16\]",
    ):
        method(states, [1, 1])


# ---------------------------------------------------------------------------------------------
# zeropad (HetLoRA)


def test_zeropad_pads_weights_by_norm_and_truncates() -> None:
    gen = torch.Generator().manual_seed(10)
    # a common scale alpha / r = 2, as HetLoRA assumes
    small, large = _pair(gen, 2, alpha=4.0), _pair(gen, 4, alpha=8.0)
    p = [0.25, 0.75]
    norms = [float(delta(small).norm()), float(delta(large).norm())]
    w = [p[0] * norms[0], p[1] * norms[1]]
    w = [x / sum(w) for x in w]
    A = w[0] * torch.cat([small.A, torch.zeros(2, 12, dtype=torch.float64)]) + w[1] * large.A
    B = w[0] * torch.cat([small.B, torch.zeros(10, 2, dtype=torch.float64)], 1) + w[1] * large.B
    out = zeropad([{Q: small}, {Q: large}], [1, 3])
    assert (out[0][Q].rank, out[1][Q].rank) == (2, 4)
    assert_close(out[1][Q].A, A) and assert_close(out[1][Q].B, B)
    assert_close(out[0][Q].A, A[:2]) and assert_close(out[0][Q].B, B[:, :2])
    plain = zeropad([{Q: small}, {Q: large}], [1, 3], norm_weighted=False)
    assert_close(plain[1][Q].A, 0.25 * torch.cat([small.A, A[2:] * 0]) + 0.75 * large.A)


def test_zeropad_folds_different_scales_into_b() -> None:
    states = _hetero_states(seed=11)  # q_proj scales 2, 4, 1
    out = zeropad(states, [1, 1, 1], ranks_out=[4, 3, 1], norm_weighted=False)
    # the global adapter is (mean_k scale_k B_k padded, mean_k A_k padded) at scale 1
    pairs = [s[Q] for s in states]
    B = torch.stack([F.pad(p.B * p.scale, (0, 4 - p.rank)) for p in pairs]).mean(0)
    A = torch.stack([F.pad(p.A, (0, 0, 0, 4 - p.rank)) for p in pairs]).mean(0)
    for k, r in enumerate([4, 3, 1]):
        got = out[k][Q]
        assert got.rank == r and got.alpha == pairs[k].alpha
        assert_close(delta(got), B[:, :r] @ A[:r])


def test_zeropad_rejects_ranks_beyond_the_largest() -> None:
    with pytest.raises(ValueError, match=r"ranks_out\[0\] = 5 exceeds the largest rank 4"):
        zeropad(_hetero_states(), [1, 1, 1], ranks_out=[5, 1, 1])
    with pytest.raises(ValueError, match=r"ranks_out has 2 entries for 3 clients"):
        zeropad(_hetero_states(), [1, 1, 1], ranks_out=[5, 1])


def test_zeropad_falls_back_to_data_weights_when_all_updates_are_zero() -> None:
    gen = torch.Generator().manual_seed(12)
    fresh = [
        LoraPair(A=torch.randn(2, 5, generator=gen), B=torch.zeros(4, 2), alpha=2.0)
        for _ in range(2)
    ]
    out = zeropad([{Q: fresh[0]}, {Q: fresh[1]}], [1, 3])
    assert_close(out[0][Q].A, 0.25 * fresh[0].A + 0.75 * fresh[1].A)


def test_prune_regulariser_and_self_prune() -> None:
    gen = torch.Generator().manual_seed(13)
    pair = _pair(gen, 8, alpha=16.0)
    A = pair.A.clone().requires_grad_(True)
    reg = prune_regulariser(LoraPair(A=A, B=pair.B, alpha=16.0), gamma=0.5, lam=0.1)
    assert_close(reg.detach(), 0.1 * pair.B[:, 4:].norm() * pair.A[4:].norm())
    reg.backward()
    assert A.grad is not None and A.grad[:4].abs().max() == 0 and A.grad[4:].abs().max() > 0

    assert self_prune(pair, gamma=0.5, threshold=1e-3) is pair  # tail is large: keep it
    tail_small = LoraPair(A=torch.cat([pair.A[:4], 1e-4 * pair.A[4:]]), B=pair.B, alpha=16.0)
    pruned = self_prune(tail_small, gamma=0.5, threshold=1e-2)
    assert pruned.rank == 4 and pruned.alpha == 16.0
    # the kept ranks' update is unchanged although alpha / r went from 2 to 4
    assert_close(delta(pruned), pair.scale * pair.B[:, :4] @ pair.A[:4])
    assert self_prune(_pair(gen, 1), gamma=0.5, threshold=1e9).rank == 1
    with pytest.raises(ValueError, match=r"gamma = 1.5; HetLoRA's kept fraction must lie in"):
        self_prune(pair, gamma=1.5, threshold=0.1)


# ---------------------------------------------------------------------------------------------
# svd (FlexLoRA)


@FAST
@given(_client_mix())
def test_svd_error_is_the_discarded_singular_values(
    mix: tuple[list[dict[str, LoraPair]], list[float]],
) -> None:
    states, weights = mix
    ref = weighted_delta(states, weights)
    outs, spectra = svd(states, weights)
    for module, expected in ref.items():
        sigma = spectra[module]
        assert_close(sigma, torch.linalg.svdvals(expected)[: sigma.numel()], rtol=0, atol=1e-10)
        for k, state in enumerate(states):
            if module not in state:
                assert module not in outs[k]
                continue
            got = outs[k][module]
            assert (got.rank, got.alpha) == (state[module].rank, state[module].alpha)
            error = float((delta(got) - expected).norm())
            scale = max(float(expected.norm()), 1.0)
            assert math.isclose(error, float(sigma[got.rank :].norm()), abs_tol=1e-9 * scale)


def test_svd_with_enough_rank_reproduces_the_aggregate_exactly() -> None:
    gen = torch.Generator().manual_seed(14)
    states = [{Q: _pair(gen, r, (20, 24), alpha)} for r, alpha in [(2, 4.0), (3, 1.0), (4, 32.0)]]
    ref = weighted_delta(states, [3, 1, 1])[Q]
    outs, spectra = svd(states, [3, 1, 1], ranks_out=[9, 9, 9])
    assert spectra[Q].numel() == 9
    for out in outs:
        assert out[Q].rank == 9
        assert_close(delta(out[Q]), ref, rtol=0, atol=1e-10)
    # more rank than the aggregate has: the surplus ranks are null (zero B) but trainable
    outs, _ = svd(states, [3, 1, 1], ranks_out=[11, 1, 1])
    assert outs[0][Q].rank == 11 and outs[0][Q].B[:, 9:].abs().max() == 0
    assert outs[0][Q].A[9:].norm(dim=1).min() > 0.99
    assert_close(delta(outs[0][Q]), ref, rtol=0, atol=1e-10)


def test_svd_splits_singular_values_evenly_and_keeps_null_ranks_trainable() -> None:
    gen = torch.Generator().manual_seed(15)
    rank_one = _pair(gen, 1, alpha=2.0)
    # two copies stack to R = 2 with a numerically zero second singular value; rank 3 pads
    outs, spectra = svd([{Q: rank_one}, {Q: rank_one}], [1.0, 1.0], ranks_out=[3, 3])
    got = outs[0][Q]
    assert_close(delta(got), delta(rank_one))
    assert spectra[Q].numel() == 2 and spectra[Q][1] < 1e-12 * spectra[Q][0]
    # the live direction: equal norms on both sides; the null ones: unit A rows and zero B
    assert_close(got.B[:, 0].norm(), got.A[0].norm())
    assert_close(got.A[1:].norm(dim=1), torch.ones(2, dtype=torch.float64))
    assert got.B[:, 1:].abs().max() == 0


def test_svd_never_decomposes_the_dense_update(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, ...]] = []
    real = torch.linalg.svd

    def spy(x: torch.Tensor, *args, **kwargs):
        seen.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    gen = torch.Generator().manual_seed(16)
    states = [{Q: _pair(gen, 2, (300, 400))}, {Q: _pair(gen, 3, (300, 400))}]
    svd(states, [1, 1])
    assert seen == [(5, 5)]


def test_svd_falls_back_to_float64_when_the_first_attempt_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = torch.linalg.svd

    def fails_in_fp32(x: torch.Tensor, *args, **kwargs):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", fails_in_fp32)
    states = _hetero_states(seed=17, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger=agg.__name__):
        outs, spectra = svd(states, [1, 1, 1])
    assert "succeeded with float64" in caplog.text
    assert outs[0][Q].A.dtype == torch.float32
    ref = weighted_delta(states, [1, 1, 1])[Q].double()
    expected = float(spectra[Q][2:].double().norm())
    assert math.isclose(float((delta(outs[0][Q]).double() - ref).norm()), expected, rel_tol=1e-4)


def test_svd_failure_and_non_finite_input_raise_clear_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    states = _hetero_states(seed=18)
    broken = [dict(s) for s in states]
    broken[1][Q] = LoraPair(A=states[1][Q].A * math.inf, B=states[1][Q].B, alpha=16.0)
    with pytest.raises(ValueError, match=rf"module '{Q}': a client sent non-finite"):
        svd(broken, [1, 1, 1])

    def never(*args, **kwargs):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", never)
    with pytest.raises(RuntimeError, match=rf"module '{Q}' failed in every attempt .*jitter"):
        svd(states, [1, 1, 1])


# --- the baselines as published, against hand computations ---------------------------------


def _two_clients() -> list[dict[str, LoraPair]]:
    """Client 0: rank 1, update [[2, 0], [0, 0]]; client 1: rank 2, update [[0, 1], [1, 1]];
    both at scale 1."""
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    return [
        {Q: LoraPair(A=t([[1, 0]]), B=t([[2], [0]]), alpha=1.0)},
        {Q: LoraPair(A=t([[0, 1], [1, 1]]), B=t([[1, 0], [0, 1]]), alpha=2.0)},
    ]


def test_hetlora_global_adapter_is_the_padded_average_at_r_max() -> None:
    states = _two_clients()
    # data weights 1:3, no norm weighting: A = 0.25 [1 0; 0 0] + 0.75 [0 1; 1 1], likewise B
    glob = agg.zeropad_global(states, [1, 3], rank=4, norm_weighted=False)[Q]
    assert glob.rank == 4 and glob.scale == 1.0
    assert_close(glob.A, torch.tensor([[0.25, 0.75], [0.75, 0.75], [0, 0], [0, 0]],
                                      dtype=torch.float64))
    assert_close(glob.B, torch.tensor([[1.25, 0, 0, 0], [0, 0.75, 0, 0]], dtype=torch.float64))
    # HetLoRA's sparsity weights: ||dW_0|| = 2, ||dW_1|| = sqrt(3)
    w0, w1 = 2 / (2 + math.sqrt(3)), math.sqrt(3) / (2 + math.sqrt(3))
    glob = agg.zeropad_global(states, [1, 1])[Q]
    assert glob.rank == 2
    assert_close(glob.A, torch.tensor([[w0, w1], [w1, w1]], dtype=torch.float64))
    assert_close(glob.B, torch.tensor([[2 * w0 + w1, 0], [0, w1]], dtype=torch.float64))
    with pytest.raises(ValueError, match="below the largest client rank 2"):
        agg.zeropad_global(states, [1, 1], rank=1)


def test_hetlora_truncation_hands_out_the_first_ranks_of_the_global_update() -> None:
    glob = agg.zeropad_global(_two_clients(), [1, 3], rank=4, norm_weighted=False)[Q]
    client = agg.truncate(glob, 1, alpha=2.0)  # scale 2: B halves so the update is kept
    assert client.rank == 1 and client.alpha == 2.0
    assert_close(client.B, torch.tensor([[0.625], [0.0]], dtype=torch.float64))
    assert_close(client.A, torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    assert_close(delta(client), torch.tensor([[0.3125, 0.9375], [0, 0]], dtype=torch.float64))
    assert_close(delta(agg.truncate(glob, 4, alpha=4.0)), delta(glob))
    with pytest.raises(ValueError, match="exceeds the rank 4"):
        agg.truncate(glob, 5, alpha=5.0)


def test_flexlora_global_model_is_the_exact_weighted_update() -> None:
    states = _two_clients()
    # 0.25 [2 0; 0 0] + 0.75 [0 1; 1 1]
    want = torch.tensor([[0.5, 0.75], [0.75, 0.75]], dtype=torch.float64)
    U, V = noisefree(states, [1, 3])[Q]
    assert_close(U @ V, want)
    assert_close(weighted_delta(states, [1, 3])[Q], want)
    # each client gets the best approximation at its rank: the symmetric global has
    # eigenvalues (1.25 +- sqrt(1.25^2 + 0.75)) / 2, so rank 1 misses by the smaller one
    outs, spectra = svd(states, [1, 3])
    root = math.sqrt(1.25 ** 2 + 0.75)
    assert_close(spectra[Q], torch.tensor([(1.25 + root) / 2, (root - 1.25) / 2],
                                          dtype=torch.float64))
    assert float((want - delta(outs[0][Q])).norm()) == pytest.approx((root - 1.25) / 2)
    assert_close(delta(outs[1][Q]), want)
    assert [outs[0][Q].alpha, outs[1][Q].alpha] == [1.0, 2.0]
