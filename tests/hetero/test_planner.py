import math
import random

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from hsplitlora.hetero.costmodel import (
    ModelDims,
    Workload,
    activation_bytes,
    client_memory,
    lora_memory_per_rank,
    step_time,
)
from hsplitlora.hetero.planner import (
    PlanError,
    PlannerSettings,
    format_plan_table,
    plan_client,
    plan_clients,
    prior_gains,
    rank_distance,
    rank_gain,
    should_replan,
)
from hsplitlora.hetero.profiles import PRESETS, DeviceProfile, format_bytes

SERVER = PRESETS["server"]
WORK = Workload.for_precision("bf16", 2, 16)


def _dims(layers: int = 4) -> ModelDims:
    return ModelDims.from_config(transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=64, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320))


DIMS = _dims()
# Frozen weights of the smallest configuration (cut 1, no adapters) and of a full client.
FLOOR = client_memory(DIMS, 1, {}, WORK).frozen_weights
ROOMY = client_memory(DIMS, 3, dict.fromkeys(DIMS.candidate_modules(range(3)), 16), WORK).total


def _device(memory: int, flops: float = 1e12) -> DeviceProfile:
    return DeviceProfile(name="dev", memory_bytes=memory, flops=flops, uplink_bps=1e7,
                         downlink_bps=1e7)


def _scores(seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {name: rng.random() for name in DIMS.candidate_modules()}


def _importance(seed: int) -> dict[str, dict[int, float]]:
    return prior_gains(DIMS, (0, 2, 4, 8, 16), _scores(seed))


# Memory alone decides (no round deadline): the regime these first tests are about.
MEMORY_ONLY = PlannerSettings(round_time_s=math.inf)


def test_rank_gain_is_concave_and_normalised():
    gains = [rank_gain(r, 16) for r in (0, 2, 4, 8, 16)]
    assert gains[0] == 0 and gains[-1] == 1
    slopes = [(b - a) / (rb - ra) for (a, ra), (b, rb) in
              zip(zip(gains, (0, 2, 4, 8, 16), strict=False),
                  zip(gains[1:], (2, 4, 8, 16), strict=False), strict=False)]
    assert all(x > y for x, y in zip(slopes, slopes[1:], strict=False))


def test_plan_respects_the_budgets_and_reports_the_cost_model():
    profiles = [_device(int(FLOOR + f * (ROOMY - FLOOR))) for f in (0.05, 0.3, 0.6, 1.0)]
    plan = plan_clients(profiles, SERVER, DIMS, _importance(0), WORK,
                        PlannerSettings(time_budget_s=1.0, round_time_s=math.inf))
    for client, profile in zip(plan.clients, profiles, strict=True):
        assert client.memory == client_memory(DIMS, client.cut, client.ranks, WORK)
        assert client.memory.total <= profile.memory_bytes == client.budget_bytes
        assert client.step_seconds == step_time(profile, SERVER, DIMS, client.cut, client.ranks,
                                                client.server_ranks, WORK).total
        assert client.step_seconds <= 1.0
        assert all(r in (2, 4, 8, 16) for r in client.ranks.values())
        assert all(DIMS.locate(n)[0] < client.cut for n in client.ranks)
        assert client.server_ranks == dict.fromkeys(
            DIMS.candidate_modules(range(client.cut, DIMS.n_layers)), 8)
    assert [c.client_id for c in plan.clients] == [0, 1, 2, 3]
    cuts = [c.cut for c in plan.clients]
    assert cuts == sorted(cuts) and cuts[0] < cuts[-1]  # more memory, deeper cut here
    assert plan.server_ranks == dict.fromkeys(
        DIMS.candidate_modules(range(min(cuts), DIMS.n_layers)), 8)


def test_a_roomy_client_adapts_everything_it_may_hold_at_the_top_rank():
    plan = plan_client(0, _device(10 * ROOMY), SERVER, DIMS, None, WORK, MEMORY_ONLY)
    assert plan.cut == DIMS.n_layers - 1  # default max_cut: the server keeps one block
    assert plan.ranks == dict.fromkeys(DIMS.candidate_modules(range(plan.cut)), 16)
    g8 = rank_gain(8, 16)
    assert plan.utility == pytest.approx((plan.cut + g8 * (DIMS.n_layers - plan.cut))
                                         / DIMS.n_layers)


def test_the_floor_budget_gets_the_smallest_cut_without_adapters():
    plan = plan_client(0, _device(FLOOR), SERVER, DIMS, None, WORK, MEMORY_ONLY)
    assert (plan.cut, plan.ranks) == (1, {})
    assert plan.memory.total == FLOOR
    assert plan.utility == pytest.approx(rank_gain(8, 16) * 3 / 4)  # the server's blocks


def test_a_server_as_good_as_any_client_keeps_every_client_at_min_cut():
    plan = plan_client(0, _device(10 * ROOMY), SERVER, DIMS, None, WORK,
                       PlannerSettings(server_rank=16, min_cut=2, round_time_s=math.inf))
    assert plan.cut == 2  # deeper cuts tie at best: the tie goes to the shallower cut


def test_more_memory_never_lowers_utility():
    importance = _importance(1)
    budgets = [int(FLOOR + i * (ROOMY - FLOOR) / 80) for i in range(0, 96)]
    utilities = [plan_client(0, _device(b), SERVER, DIMS, importance, WORK, MEMORY_ONLY).utility
                 for b in budgets]
    assert all(a <= b + 1e-12 for a, b in zip(utilities, utilities[1:], strict=False))
    assert utilities[0] < utilities[-1]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), low=st.floats(0, 1), extra=st.floats(0, 0.3))
def test_more_memory_never_lowers_utility_for_any_importance(seed, low, extra):
    importance = _importance(seed)
    small = int(FLOOR + low * (ROOMY - FLOOR))
    large = int(small + extra * (ROOMY - FLOOR))
    u_small = plan_client(0, _device(small), SERVER, DIMS, importance, WORK, MEMORY_ONLY).utility
    u_large = plan_client(0, _device(large), SERVER, DIMS, importance, WORK, MEMORY_ONLY).utility
    assert u_small <= u_large + 1e-12


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), fraction=st.floats(0, 1))
def test_a_more_important_matrix_never_gets_less_rank_than_one_of_its_shape(seed, fraction):
    importance = _scores(seed)
    budget = int(FLOOR + fraction * (ROOMY - FLOOR))
    plan = plan_client(0, _device(budget), SERVER, DIMS, prior_gains(DIMS, (0, 2, 4, 8, 16),
                                                                     importance), WORK, MEMORY_ONLY)
    assert plan.memory.total <= budget
    if not plan.ranks:
        return
    first = min(DIMS.locate(n)[0] for n in plan.ranks)
    names = list(DIMS.candidate_modules(range(first, plan.cut)))
    for a in names:
        for b in names:
            ma, mb = DIMS.locate(a)[1], DIMS.locate(b)[1]
            if (ma.d_out, ma.d_in) == (mb.d_out, mb.d_in) and importance[a] > importance[b]:
                assert plan.ranks.get(a, 0) >= plan.ranks.get(b, 0), (a, b)


def test_ranks_spread_by_importance_within_a_block():
    # Among k and v (same shape), only the important one gets an adapter when memory is short.
    dims = ModelDims.from_config(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=160, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=320), targets=("k_proj", "v_proj"))
    importance = {"model.layers.0.self_attn.k_proj": 1.0, "model.layers.0.self_attn.v_proj": 5.0}
    # The planner reserves the inputs of every candidate of the blocks it adapts, then
    # spends per rank: room for exactly two ranks of one of them.
    reserved = client_memory(dims, 1, {}, WORK).frozen_weights + activation_bytes(
        dims, range(1), {}, WORK, input_grad=False, reserve_inputs=True)
    budget = reserved + 2 * lora_memory_per_rank(dims.candidates[1], WORK)
    one = PlannerSettings(max_cut=1, round_time_s=math.inf)
    plan = plan_client(0, _device(budget), SERVER, dims, prior_gains(dims, one.ranks, importance),
                       WORK, one)
    assert plan.ranks == {"model.layers.0.self_attn.v_proj": 2}
    assert plan.memory.total <= budget
    swapped = {k: 6 - v for k, v in importance.items()}
    plan = plan_client(0, _device(budget), SERVER, dims, prior_gains(dims, one.ranks, swapped),
                       WORK, one)
    assert plan.ranks == {"model.layers.0.self_attn.k_proj": 2}


def test_an_impossible_memory_budget_names_the_client_and_the_shortfall():
    short = FLOOR - 3 * 1024
    with pytest.raises(PlanError) as err:
        plan_clients([_device(10 * ROOMY), _device(short)], SERVER, DIMS, None, WORK)
    message = str(err.value)
    assert "client 1 (dev)" in message
    assert format_bytes(short) in message and "misses by 3.0 KiB" in message
    assert format_bytes(FLOOR) in message and "min_cut" in message


def test_an_impossible_time_budget_says_by_how_much():
    slow = _device(10 * ROOMY, flops=1e3)
    with pytest.raises(PlanError, match=r"client 0 \(dev\): step-time budget 0\.5 s misses by"):
        plan_client(0, slow, SERVER, DIMS, None, WORK, PlannerSettings(time_budget_s=0.5))


def test_a_time_budget_holds_slow_clients_at_shallow_cuts():
    fast = plan_client(0, _device(10 * ROOMY, flops=1e12), SERVER, DIMS, None, WORK, MEMORY_ONLY)
    limit = step_time(_device(1, flops=1e8), SERVER, DIMS, 1, {}, fast.server_ranks, WORK).total
    slow = plan_client(0, _device(10 * ROOMY, flops=1e8), SERVER, DIMS, None, WORK,
                       PlannerSettings(time_budget_s=limit * 1.5, round_time_s=math.inf))
    assert slow.cut < fast.cut and slow.step_seconds <= limit * 1.5


def test_settings_and_importance_are_checked():
    with pytest.raises(ValueError, match="start at 0"):
        PlannerSettings(ranks=(2, 4))
    with pytest.raises(ValueError, match="below min_cut"):
        PlannerSettings(min_cut=3, max_cut=2)
    with pytest.raises(ValueError, match="does not fit a model of 4 blocks"):
        plan_client(0, _device(ROOMY), SERVER, DIMS, None, WORK, PlannerSettings(max_cut=7))
    with pytest.raises(ValueError, match="names a candidate matrix"):
        prior_gains(DIMS, (0, 2), {"layers.0.q": 1.0})
    with pytest.raises(ValueError, match="finite"):
        prior_gains(DIMS, (0, 2), {"model.layers.0.self_attn.q_proj": math.nan})


def test_rank_distance_and_should_replan():
    base = {f"m{i}": float(i) for i in range(10)}
    assert rank_distance(base, {k: v * 10 + 3 for k, v in base.items()}) == 0  # same order
    assert rank_distance(base, {k: -v for k, v in base.items()}) == pytest.approx(2)
    swapped = {**base, "m4": 5.0, "m5": 4.0}  # one adjacent swap: tau = (44 - 1) / 45
    assert rank_distance(base, swapped) == pytest.approx(2 / 45)
    assert rank_distance(swapped, base) == rank_distance(base, swapped)
    assert not should_replan(base, swapped, threshold=0.05)
    assert should_replan(base, swapped, threshold=0.04)
    assert should_replan(None, base, threshold=0.5) and should_replan({}, base, threshold=0.5)
    assert rank_distance({"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 2.0}) == 0
    assert rank_distance({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 2.0}) == 1
    assert rank_distance({"a": 1.0}, {"b": 1.0}) == pytest.approx(2)  # missing names score 0


def test_plan_table_shows_cut_ranks_memory_and_time():
    profiles = [_device(FLOOR), _device(10 * ROOMY)]
    plan = plan_clients(profiles, SERVER, DIMS, None, WORK, MEMORY_ONLY)
    console = Console(record=True, width=220)
    console.print(format_plan_table(plan, DIMS))
    text = console.export_text()
    for header in ("client", "profile", "cut", "q", "down", "memory / budget", "step"):
        assert header in text
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert "0×1" in rows[0] and "16×3" in rows[1]
    assert f"{format_bytes(plan.clients[0].memory.total)} / {format_bytes(FLOOR)} (100%)" \
        in rows[0]
    assert "at rank 8" in text


def test_gpt2_plans_use_its_fused_matrices():
    dims = ModelDims.from_config(transformers.GPT2Config(
        n_layer=3, n_embd=64, n_head=4, vocab_size=320, n_positions=64, bos_token_id=0,
        eos_token_id=0))
    work = Workload.for_precision("fp32", 2, 16, lora_dropout=0.1)
    plan = plan_clients([_device(10 * ROOMY)], SERVER, dims, None, work, MEMORY_ONLY)
    assert plan.clients[0].cut == 2
    assert set(plan.clients[0].ranks) == {f"transformer.h.{b}.{m}" for b in range(2) for m in
                                          ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                           "mlp.c_proj")}
    console = Console(record=True, width=200)
    console.print(format_plan_table(plan, dims))
    text = console.export_text()
    assert all(k in text for k in ("qkv", "up", "down", "16×2"))
