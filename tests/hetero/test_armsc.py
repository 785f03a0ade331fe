import itertools
import math
import random
from dataclasses import replace

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from hsplitlora.hetero.armsc import (
    ClientPlan,
    PlanError,
    PlannerSettings,
    format_plan_table,
    merged_downloads,
    plan_client,
    plan_clients,
    prior_gains,
    rank_distance,
    rank_gain,
    server_load,
    should_replan,
)
from hsplitlora.hetero.costmodel import (
    ModelDims,
    Workload,
    activation_bytes,
    block_flops,
    bytes_down,
    bytes_up,
    client_flops,
    client_memory,
    lora_flops_per_rank,
    lora_memory_per_rank,
    server_flops,
    server_memory,
    step_time,
)
from hsplitlora.hetero.profiles import PRESETS, DeviceProfile, format_bytes
from hsplitlora.models.structure import client_blocks

SERVER = PRESETS["server"]
WORK = Workload.for_precision("bf16", 2, 16)


def _dims(layers: int = 4) -> ModelDims:
    return ModelDims.from_config(transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=64, intermediate_size=160,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320))


DIMS = _dims()
# Memory of the smallest configuration (cut 1, no adapters: frozen weights and the hidden
# state sent) and of a full client.
FLOOR = client_memory(DIMS, 1, {}, WORK).total
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


def test_a_u_shaped_plan_costs_the_tail_and_adapts_it_on_the_client():
    """``tail=1``: every client keeps block 3 and the head; its cut stops at 2 (the server
    keeps a block), its adapters may sit on the tail, and every figure is the cost
    model's with the tail (two transfers each way, the tail's weights and FLOPs)."""
    tail = 1
    floor = client_memory(DIMS, 1, {}, WORK, tail).total
    roomy = client_memory(DIMS, 2, dict.fromkeys(DIMS.candidate_modules(
        client_blocks(2, tail, DIMS.n_layers)), 16), WORK, tail).total
    profiles = [_device(int(floor * 1.2 + f * (roomy - floor))) for f in (0.0, 0.3, 1.5)]
    plan = plan_clients(profiles, SERVER, DIMS, _importance(0), WORK,
                        PlannerSettings(round_time_s=math.inf, tail=tail))
    for client, profile in zip(plan.clients, profiles, strict=True):
        assert 1 <= client.cut <= DIMS.n_layers - tail - 1
        assert client.memory == client_memory(DIMS, client.cut, client.ranks, WORK, tail)
        assert client.memory.total <= profile.memory_bytes
        assert client.step_seconds == step_time(profile, SERVER, DIMS, client.cut, client.ranks,
                                                client.server_ranks, WORK, tail).total
        own = set(client_blocks(client.cut, tail, DIMS.n_layers))
        assert all(DIMS.locate(n)[0] in own for n in client.ranks)
        assert client.server_ranks == dict.fromkeys(
            DIMS.candidate_modules(range(client.cut, DIMS.n_layers - tail)), 8)
    roomiest = plan.clients[-1]
    assert roomiest.cut == 2  # the deepest cut a tail of 1 leaves
    assert {n: r for n, r in roomiest.ranks.items() if DIMS.locate(n)[0] == 3} == \
        dict.fromkeys(DIMS.candidate_modules(range(3, 4)), 16)  # the tail, adapted in full
    assert plan.server.memory_bytes == server_load(plan.clients, SERVER, DIMS, WORK, 10,
                                                   tail=tail).memory_bytes
    no_tail = server_load(plan.clients, SERVER, DIMS, WORK, 10).memory_bytes
    assert plan.server.memory_bytes < no_tail  # the server holds no head, no last block


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
    reserved = client_memory(dims, 1, {}, WORK).total + activation_bytes(
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


# --- trade-offs beyond memory -------------------------------------------------------------

Q = (0, 2, 4, 8)
SMALL = ModelDims.from_config(transformers.LlamaConfig(
    num_hidden_layers=3, hidden_size=64, intermediate_size=160, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=320),
    targets=("q_proj", "v_proj", "down_proj"))


def _spectral(dims: ModelDims, seed: int, ranks=Q) -> dict[str, dict[int, float]]:
    """Energies of random decaying spectra, each matrix at its own scale."""
    rng = random.Random(seed)
    out = {}
    for name in dims.candidate_modules():
        sigma = sorted((rng.random() ** 3 for _ in range(16)), reverse=True)
        energy = [0.0]
        for x in sigma:
            energy.append(energy[-1] + x * x)
        scale = rng.random()
        out[name] = {r: scale * energy[r] for r in ranks}
    return out


def _tail_reserve(dims: ModelDims, tail: int) -> int:
    """A U-shaped client's tail: the inputs of its candidate matrices reserved as if
    adapted (the planner's budget for them, additive in ranks as for the head's blocks)."""
    if not tail:
        return 0
    blocks = range(dims.n_layers - tail, dims.n_layers)
    return (activation_bytes(dims, blocks, {}, WORK, input_grad=True, reserve_inputs=True)
            - activation_bytes(dims, blocks, {}, WORK, input_grad=True))


def _brute_force(dims, profile, gains, s: PlannerSettings) -> tuple[float, float]:
    """The best U over every cut and every rank assignment, costed as the planner costs
    (frozen weights, activations reserved from the first adapted block, per-rank bytes,
    FLOPs and adapter bytes; a U-shaped client's tail, its two transfers each way); and
    the largest gain of a single rank step."""
    total = sum(g[s.ranks[-1]] for g in gains.values())
    norm = {n: {r: v / total for r, v in g.items()} for n, g in gains.items()}
    up = min(profile.uplink_bps, SERVER.downlink_bps)
    down = min(SERVER.uplink_bps, profile.downlink_bps)
    tail, n_layers = s.tail, dims.n_layers
    transfer = (bytes_up(WORK.batch, WORK.seq, dims.hidden, WORK.act_bytes, tail) / up
                + bytes_down(WORK.batch, WORK.seq, dims.hidden, WORK.act_bytes, tail) / down)
    block = block_flops(dims, WORK)
    tail_flops = (client_flops(dims, 1, {}, WORK, tail).total
                  - client_flops(dims, 1, {}, WORK).total)
    best = -1.0
    for cut in range(s.min_cut, n_layers - tail if tail else n_layers):
        names = list(dims.candidate_modules(client_blocks(cut, tail, n_layers)))
        served_names = dims.candidate_modules(range(cut, n_layers - tail))
        served = sum(norm[n][s.server_rank] for n in served_names)
        served_s = server_flops(dims, cut, dict.fromkeys(served_names, s.server_rank),
                                WORK, tail).total / SERVER.flops
        for assign in itertools.product(s.ranks, repeat=len(names)):
            ranks = {n: r for n, r in zip(names, assign, strict=True) if r}
            first = min((dims.locate(n)[0] for n in ranks if dims.locate(n)[0] < cut),
                        default=cut)
            matrices = {n: dims.locate(n)[1] for n in ranks}
            memory = (client_memory(dims, cut, {}, WORK, tail).total + _tail_reserve(dims, tail)
                      + activation_bytes(dims, range(first, cut), {}, WORK, input_grad=False,
                                         reserve_inputs=True)
                      + sum(r * lora_memory_per_rank(matrices[n], WORK) for n, r in ranks.items()))
            flops = (cut * block.forward + (cut - first) * block.backward + tail_flops
                     + sum(r * lora_flops_per_rank(matrices[n], WORK).total
                           for n, r in ranks.items()))
            step = flops / profile.flops + transfer + served_s
            moved = sum(r * matrices[n].lora_params(1) for n, r in ranks.items())
            rnd = s.interval * step + moved * WORK.lora_bytes * (1 / up + 1 / down)
            if memory > profile.memory_bytes or rnd > (s.round_time_s or math.inf):
                continue
            best = max(best, served + sum(norm[n][r] for n, r in ranks.items()))
    step_gain = max(g[b] - g[a] for g in norm.values() for a, b in zip(s.ranks, s.ranks[1:],
                                                                           strict=False))
    return best, step_gain


@pytest.mark.parametrize("tail", [0, 1])
def test_greedy_is_within_one_rank_step_of_brute_force(tail):
    """With a U-shaped client's tail (``tail=1``: cut 1, the server runs block 1 alone)
    the tail's matrices are the client's to adapt, within the same budgets."""
    floor = client_memory(SMALL, 1, {}, WORK, tail).total + _tail_reserve(SMALL, tail)
    deepest = 1 if tail else 2
    roomy = client_memory(SMALL, deepest, dict.fromkeys(SMALL.candidate_modules(
        client_blocks(deepest, tail, SMALL.n_layers)), 8), WORK, tail).total
    gaps = []
    for seed in range(4):
        gains = _spectral(SMALL, seed)
        for fraction in (0.1, 0.3, 0.5, 0.8):
            device = DeviceProfile(name="d", memory_bytes=int(floor + fraction * (roomy - floor)),
                                   flops=1e9, uplink_bps=1e5, downlink_bps=1e5)
            memory_only = PlannerSettings(ranks=Q, server_rank=2, round_time_s=math.inf,
                                          tail=tail)
            unhurried = plan_client(0, device, SERVER, SMALL, gains, WORK, memory_only)
            # and a deadline 3 % short of the memory-only plan's round: time binds too
            hurried = replace(memory_only, round_time_s=0.97 * unhurried.round_seconds)
            for s in (memory_only, hurried):
                best, step_gain = _brute_force(SMALL, device, gains, s)
                try:
                    got = plan_client(0, device, SERVER, SMALL, gains, WORK, s).utility
                except PlanError:  # too short for any plan: brute force agrees
                    assert best == -1
                    continue
                assert got <= best + 1e-12
                assert best - got <= step_gain, (seed, fraction, s.round_time_s)
                gaps.append((best - got, step_gain))
    worst = max(g for g, _ in gaps)
    print(f"\ngreedy vs brute force (tail {tail}) on {len(gaps)} instances: mean gap "
          f"{sum(g for g, _ in gaps) / len(gaps):.4f}, worst {worst:.4f} "
          f"(bound: one rank step, {min(b for _, b in gaps):.4f}-{max(b for _, b in gaps):.4f}), "
          f"optimal in {sum(g < 1e-12 for g, _ in gaps)}")


def _population(n: int, memory: int, flops: float = 1e9, link: float = 1e5):
    return [DeviceProfile(name=f"d{i}", memory_bytes=memory, flops=flops, uplink_bps=link,
                          downlink_bps=link) for i in range(n)]


def _memories(low: float, extra: float) -> tuple[int, int, int, int]:
    """The floor (one block, no LoRA), a roomy client's memory (two blocks, rank 8 on
    every matrix), and the two memories a monotonicity test compares: ``small``, ``low``
    of the way from the floor to roomy, and ``large``, a further ``extra`` of that span."""
    floor = client_memory(SMALL, 1, {}, WORK).total
    roomy = client_memory(SMALL, 2, dict.fromkeys(SMALL.candidate_modules(range(2)), 8),
                          WORK).total
    small = int(floor + low * (roomy - floor))
    return floor, roomy, small, int(small + extra * (roomy - floor))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), low=st.floats(0, 1), extra=st.floats(0, 0.5),
       deadline=st.floats(0.9, 2.0))
def test_at_a_fixed_deadline_more_memory_never_lowers_a_clients_utility(seed, low, extra,
                                                                      deadline):
    gains = _spectral(SMALL, seed)
    _, roomy, small, large = _memories(low, extra)
    s = PlannerSettings(ranks=Q, server_rank=2, round_time_s=deadline)
    try:
        u_small = plan_clients(_population(1, small) + _population(1, roomy), SERVER, SMALL,
                               gains, WORK, s).clients[0].utility
    except PlanError:
        return  # the deadline is too short for this client at all
    u_large = plan_clients(_population(1, large) + _population(1, roomy), SERVER, SMALL, gains,
                           WORK, s).clients[0].utility
    assert u_small <= u_large + 1e-12


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), low=st.floats(0, 1), extra=st.floats(0, 0.5))
def test_choosing_the_deadline_more_memory_never_lowers_the_objective(seed, low, extra):
    gains = _spectral(SMALL, seed)
    floor, roomy, small, large = _memories(low, extra)
    s = PlannerSettings(ranks=Q, server_rank=2)
    others = _population(2, int(floor + 0.5 * (roomy - floor)), flops=3e9)

    def chosen(memory: int) -> float:
        plan = plan_clients([*_population(1, memory), *others], SERVER, SMALL, gains, WORK, s)
        return sum(c.utility for c in plan.clients) / 3 / plan.round_seconds, plan

    (phi_small, p_small), (phi_large, p_large) = chosen(small), chosen(large)
    # The planner ranks deadlines by progress over the deadline (>= the plans' own round),
    # so compare that: it never falls.
    deadline_small = max(p_small.round_seconds, p_large.round_seconds)
    assert phi_large >= phi_small * p_small.round_seconds / deadline_small - 1e-12


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), fraction=st.floats(0.05, 1), factor=st.floats(1.0, 20.0),
       which=st.integers(0, 5))
def test_making_a_matrix_more_important_never_lowers_its_rank(seed, fraction, factor, which):
    gains = _spectral(SMALL, seed)
    floor = client_memory(SMALL, 2, {}, WORK).total
    roomy = client_memory(SMALL, 2, dict.fromkeys(SMALL.candidate_modules(range(2)), 8),
                          WORK).total
    device = _population(1, int(floor + fraction * (roomy - floor)))[0]
    s = PlannerSettings(ranks=Q, server_rank=2, min_cut=2, max_cut=2, round_time_s=math.inf)
    name = list(SMALL.candidate_modules(range(2)))[which]
    before = plan_client(0, device, SERVER, SMALL, gains, WORK, s).ranks.get(name, 0)
    boosted = {**gains, name: {r: factor * v for r, v in gains[name].items()}}
    after = plan_client(0, device, SERVER, SMALL, boosted, WORK, s).ranks.get(name, 0)
    assert after >= before


def test_a_slower_client_gets_a_shallower_cut():
    gains = _spectral(SMALL, 3)
    memory = client_memory(SMALL, 2, dict.fromkeys(SMALL.candidate_modules(range(2)), 8),
                           WORK).total
    speeds = [3e6, 1e7, 3e7, 1e8, 3e8, 1e9, 3e9]
    clients = [DeviceProfile(name=f"{f:.0e}", memory_bytes=memory, flops=f, uplink_bps=1e6,
                             downlink_bps=1e6) for f in speeds]
    plan = plan_clients(clients, SERVER, SMALL, gains, WORK,
                        PlannerSettings(ranks=Q, server_rank=2))
    cuts = [c.cut for c in plan.clients]
    assert cuts == sorted(cuts) and cuts[0] < cuts[-1], cuts
    assert all(c.round_seconds <= plan.round_seconds + 1e-12 for c in plan.clients)


def test_rounds_wait_for_the_slowest_step_and_then_the_slowest_aggregation():
    """The engine's rounds are synchronous (every local step waits for the slowest
    client, every aggregation for the slowest link), and so is the plan's round: I times
    the slowest step (or the server's queue) plus the slowest aggregation, more than any
    one client's own I x step + aggregation when the slowest step and the slowest
    aggregation are different clients'."""
    gains = _spectral(SMALL, 1)
    memory = client_memory(SMALL, 2, dict.fromkeys(SMALL.candidate_modules(range(2)), 8),
                           WORK).total
    slow_compute = DeviceProfile(name="slow compute", memory_bytes=memory, flops=1e7,
                                 uplink_bps=1e7, downlink_bps=1e7)
    slow_link = DeviceProfile(name="slow link", memory_bytes=memory, flops=1e10,
                              uplink_bps=2e5, downlink_bps=2e5)
    s = PlannerSettings(ranks=Q, server_rank=2)
    plan = plan_clients([slow_compute, slow_link], SERVER, SMALL, gains, WORK, s)
    c0, c1 = plan.clients
    for c in plan.clients:
        assert c.round_seconds - c.aggregation_seconds > 0
    steps = [(c.round_seconds - c.aggregation_seconds) / s.interval for c in plan.clients]
    served = s.interval * sum(c.server_seconds for c in plan.clients)
    assert plan.round_seconds == pytest.approx(
        max(s.interval * max(steps), served) + max(c.aggregation_seconds for c in plan.clients),
        rel=1e-9)
    slowest_step = max(range(2), key=lambda i: steps[i])
    slowest_agg = max(range(2), key=lambda i: plan.clients[i].aggregation_seconds)
    assert slowest_step != slowest_agg  # the instance: two different bottlenecks
    assert plan.round_seconds > max(c0.round_seconds, c1.round_seconds)


def test_merged_downloads_count_every_contributors_rank_up_to_the_dense_size():
    """Per block: each matrix's merged update as it is sent, min(dense, R (d_in + d_out))
    fp32 values, R the ranks of the clients that hold it plus the server side's (the
    widest, shared; summed, per participant)."""
    q = SMALL.module_name(0, SMALL.locate("model.layers.0.self_attn.q_proj")[1])
    matrix = SMALL.locate(q)[1]
    down1 = SMALL.module_name(1, SMALL.locate("model.layers.1.mlp.down_proj")[1])
    d1 = SMALL.locate(down1)[1]

    def client(cut, ranks, server_ranks):
        return ClientPlan(0, SERVER, cut, ranks, server_ranks, None, 0, 0.0, 0.0)

    plans = [client(1, {q: 2}, {down1: 4}), client(1, {q: 4}, {down1: 8})]
    shared = merged_downloads(plans, SMALL, shared_server=True)
    apart = merged_downloads(plans, SMALL, shared_server=False)
    assert shared[0] == apart[0] == 4 * matrix.lora_params(6)
    assert shared[1] == 4 * min(d1.d_in * d1.d_out, d1.lora_params(8))
    assert apart[1] == 4 * min(d1.d_in * d1.d_out, d1.lora_params(12))
    wide = [client(1, {q: 64}, {}), client(1, {q: 64}, {})]  # past the dense size
    assert merged_downloads(wide, SMALL)[0] == 4 * matrix.d_in * matrix.d_out
    assert shared[2] == 0


def test_with_merged_downloads_a_plan_pays_for_what_its_blocks_download():
    """Planning with a merging aggregator: each client's aggregation is its adapter up
    plus the merged updates of its blocks down, costed from the plans themselves (planned
    again until they repeat); a slow downlink then keeps a client's cut shallow."""
    gains = _spectral(SMALL, 2)
    memory = client_memory(SMALL, 2, dict.fromkeys(SMALL.candidate_modules(range(2)), 8),
                           WORK).total
    devices = [DeviceProfile(name=f"d{i}", memory_bytes=memory, flops=1e9, uplink_bps=1e6,
                             downlink_bps=down) for i, down in enumerate((1e6, 3e4))]
    s = PlannerSettings(ranks=Q, server_rank=2, merged_download=True)
    plan = plan_clients(devices, SERVER, SMALL, gains, WORK, s)
    merged = merged_downloads(plan.clients, SMALL)
    for c, dev in zip(plan.clients, devices, strict=True):
        up = min(dev.uplink_bps, SERVER.downlink_bps)
        down = min(SERVER.uplink_bps, dev.downlink_bps)
        sent = sum(SMALL.locate(m)[1].lora_params(r) for m, r in c.ranks.items()) * 4
        fetched = sum(merged[b] for b in range(c.cut))
        assert fetched > sent > 0
        assert c.aggregation_seconds == pytest.approx(sent / up + fetched / down, rel=1e-9)
    assert plan.clients[1].cut <= plan.clients[0].cut


def test_merged_plans_are_costed_as_they_run_and_beat_adapting_nothing():
    """Every client's ranks raise every holder's merged download, which no client's own
    choice sees: 30 clients on slow downlinks could settle on each adapting block 0 and
    all downloading its merged update densely. The plan returned is costed from its own
    merged updates, and progresses at least as fast per second as the plan in which no
    client adapts anything (computed here by hand)."""
    gains = _spectral(SMALL, 3)
    memory = client_memory(SMALL, 2, dict.fromkeys(SMALL.candidate_modules(range(2)), 8),
                           WORK).total
    devices = [DeviceProfile(name=f"d{i}", memory_bytes=memory, flops=1e10, uplink_bps=1e6,
                             downlink_bps=2e4) for i in range(30)]
    s = PlannerSettings(ranks=Q, server_rank=2, merged_download=True, shared_server=True)
    plan = plan_clients(devices, SERVER, SMALL, gains, WORK, s)
    merged = merged_downloads(plan.clients, SMALL, shared_server=True)
    for c, dev in zip(plan.clients, devices, strict=True):
        sent = sum(SMALL.locate(m)[1].lora_params(r) for m, r in c.ranks.items()) * 4
        fetched = sum(merged[b] for b in range(c.cut))
        assert c.aggregation_seconds == pytest.approx(
            sent / dev.uplink_bps + fetched / dev.downlink_bps, rel=1e-9)
    steps = [(c.round_seconds - c.aggregation_seconds) / s.interval for c in plan.clients]
    rounds = (max(s.interval * max(steps), s.interval * sum(c.server_seconds
                                                            for c in plan.clients))
              + max(c.aggregation_seconds for c in plan.clients))
    assert plan.round_seconds == pytest.approx(rounds, rel=1e-9)
    assert plan.objective == pytest.approx(
        sum(c.utility for c in plan.clients) / len(devices) / rounds, rel=1e-9)
    # No client adapter, every client at cut 1: the server's rank-2 adapters on blocks
    # 1 and 2 are the whole gain, nothing is merged into block 0, nothing travels.
    server_ranks = dict.fromkeys(SMALL.candidate_modules(range(1, 3)), 2)
    top = sum(g[Q[-1]] for g in gains.values())
    utility = sum(gains[m][2] for m in server_ranks) / top
    step = step_time(devices[0], SERVER, SMALL, 1, {}, server_ranks, WORK).total
    served = server_flops(SMALL, 1, server_ranks, WORK).total / SERVER.flops
    idle = utility / (s.interval * max(step, len(devices) * served))
    assert plan.objective >= idle * (1 - 1e-9)


def test_a_busy_server_pushes_clients_deeper():
    # Alone, a client leaves the blocks to the server; with many clients sharing it, the
    # server's equal share is too small for that, so each client takes more blocks.
    gains = _spectral(SMALL, 0)
    memory = client_memory(SMALL, 2, dict.fromkeys(SMALL.candidate_modules(range(2)), 8),
                           WORK).total
    weak_server = SERVER.model_copy(update={"flops": 1e10})
    s = PlannerSettings(ranks=Q, server_rank=8)
    alone = plan_clients(_population(1, memory, flops=1e10, link=1e7), weak_server, SMALL,
                         gains, WORK, s)
    crowd = plan_clients(_population(40, memory, flops=1e10, link=1e7), weak_server, SMALL,
                         gains, WORK, s)
    assert alone.clients[0].cut < crowd.clients[0].cut
    assert crowd.server.compute_seconds <= crowd.round_seconds + 1e-12
    assert crowd.server.compute_seconds == pytest.approx(
        s.interval * sum(c.server_seconds for c in crowd.clients))


def test_spectral_gains_spend_rank_where_the_spectrum_is_wide():
    # Two matrices of one shape and equal total energy: a rank-one gradient gains nothing
    # past rank 2, a flat one keeps gaining, so it gets the higher rank.
    dims = ModelDims.from_config(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=160, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=320), targets=("k_proj", "v_proj"))
    gains = {"model.layers.0.self_attn.k_proj": {r: 1.0 if r else 0.0 for r in Q},
             "model.layers.0.self_attn.v_proj": {r: r / 8 for r in Q}}
    reserved = client_memory(dims, 1, {}, WORK).total + activation_bytes(
        dims, range(1), {}, WORK, input_grad=False, reserve_inputs=True)
    budget = reserved + 10 * lora_memory_per_rank(dims.candidates[1], WORK)
    plan = plan_client(0, _device(budget), SERVER, dims, gains, WORK,
                       PlannerSettings(ranks=Q, max_cut=1, server_rank=0,
                                       round_time_s=math.inf))
    assert plan.ranks == {"model.layers.0.self_attn.k_proj": 2,
                          "model.layers.0.self_attn.v_proj": 8}


def test_budgets_are_costed_in_the_stored_dtype():
    # Frozen fp32 weights cost twice what bf16 ones do: a budget between the two sizes of
    # a cut holds that cut only when the weights are stored in bf16.
    bf16, fp32 = WORK, replace(WORK, weight_bytes=4)
    budget = client_memory(DIMS, 3, {}, bf16).total + 1024
    assert client_memory(DIMS, 3, {}, fp32).total > budget
    s = PlannerSettings(min_cut=3, max_cut=3, round_time_s=math.inf)
    assert plan_client(0, _device(budget), SERVER, DIMS, None, bf16, s).cut == 3
    with pytest.raises(PlanError, match="frozen weights"):
        plan_client(0, _device(budget), SERVER, DIMS, None, fp32, s)
    plan = plan_client(0, _device(10 * ROOMY), SERVER, DIMS, None, fp32, MEMORY_ONLY)
    assert plan.memory.frozen_weights == 4 * (DIMS.embedding_params + DIMS.norm_params
                                              + plan.cut * DIMS.block_params)
    # exact merges beside the base: the pre-merge copy and the fp32 delta of each candidate
    merged = replace(bf16, merge_bytes=2 + 4)
    candidates = sum(m.d_in * m.d_out for m in DIMS.candidates)
    for cut in (1, 3):
        assert (client_memory(DIMS, cut, {}, merged).frozen_weights
                == client_memory(DIMS, cut, {}, bf16).frozen_weights + 6 * cut * candidates)
        assert (server_memory(DIMS, cut, {}, merged).frozen_weights
                == server_memory(DIMS, cut, {}, bf16).frozen_weights
                + 6 * (DIMS.n_layers - cut) * candidates)


def test_the_server_load_is_costed_and_checked():
    profiles = [_device(FLOOR), _device(10 * ROOMY)]
    plan = plan_clients(profiles, SERVER, DIMS, None, WORK, MEMORY_ONLY)
    mems = [server_memory(DIMS, c.cut, c.server_ranks, WORK) for c in plan.clients]
    want = (max(m.frozen_weights for m in mems)
            + max(m.activations + m.exchanged for m in mems)
            + sum(m.lora_weights + m.lora_grads + m.optimizer for m in mems))
    assert plan.server.memory_bytes == want
    small = SERVER.model_copy(update={"memory_bytes": want - 1})
    with pytest.raises(PlanError, match="main server .* would need"):
        plan_clients(profiles, small, DIMS, None, WORK, MEMORY_ONLY)


def test_gains_are_checked():
    with pytest.raises(ValueError, match="not candidate matrices"):
        plan_client(0, _device(ROOMY), SERVER, DIMS, {"layers.0.q": {2: 1.0}}, WORK)
    convex = {"model.layers.0.self_attn.q_proj": {0: 0, 2: 0.1, 4: 0.2, 8: 1.0, 16: 2.0}}
    with pytest.raises(ValueError, match="no more than the one before"):
        plan_client(0, _device(ROOMY), SERVER, DIMS, convex, WORK)
    with pytest.raises(ValueError, match="lack rank"):
        plan_client(0, _device(ROOMY), SERVER, DIMS,
                    {"model.layers.0.self_attn.q_proj": {2: 1.0}}, WORK)


def test_llama2_7b_shaped_plans_fit_fp32_budgets_quickly():
    import time

    from hsplitlora.hetero.profiles import PAPER_MEMORY_RANGE, heterogeneous

    dims = ModelDims.from_config(transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
        tie_word_embeddings=False))
    work = Workload.for_precision("bf16", 4, 512, weight_bytes=4)
    clients = heterogeneous(100, 0, PAPER_MEMORY_RANGE, "laptop")
    start = time.perf_counter()
    plan = plan_clients(clients, SERVER, dims, None, work)
    assert time.perf_counter() - start < 60
    assert all(c.memory.total <= c.budget_bytes for c in plan.clients)
    assert all(c.memory.frozen_weights
               == 4 * (dims.embedding_params + dims.norm_params + c.cut * dims.block_params)
               for c in plan.clients)
    assert plan.server.memory_bytes <= SERVER.memory_bytes
    # 100 clients swamp the server's share: clients hold more blocks the more memory they have
    by_memory = sorted(plan.clients, key=lambda c: c.budget_bytes)
    assert by_memory[0].cut < by_memory[-1].cut


def test_the_weakest_rank_counts_a_u_shaped_clients_tail():
    from hsplitlora.hetero.costmodel import ModelDims, Workload, client_memory
    from hsplitlora.hetero.planner import uniform_rank
    from hsplitlora.hetero.profiles import DeviceProfile
    from tests.conftest import tiny_config

    dims = ModelDims.from_config(tiny_config("llama"))
    work = Workload.for_precision("fp32", 2, 16)
    modules = list(dims.candidate_modules())
    cut, tail, ranks = 1, 2, (2, 4, 8)

    def need(r: int, t: int) -> int:  # adapters on the client's blocks: 0, and 2, 3 with a tail
        own = {0, 2, 3} if t else {0}
        return client_memory(dims, cut, {m: r for m in modules if dims.locate(m)[0] in own},
                             work, t).total

    def device(memory: int) -> DeviceProfile:
        return DeviceProfile(name="phone", memory_bytes=memory, flops=1e9, uplink_bps=1e6,
                             downlink_bps=1e6)

    assert need(8, 0) < need(2, tail)  # the tail's blocks, head and loss cost more than rank
    assert uniform_rank(dims, device(need(8, 0)), cut, modules, ranks, work) == 8
    assert uniform_rank(dims, device(need(4, tail)), cut, modules, ranks, work, tail) == 4
    with pytest.raises(PlanError, match="cannot hold cut 1 and a tail of 2 .* or train.tail"):
        uniform_rank(dims, device(need(8, 0)), cut, modules, ranks, work, tail)


def test_a_planned_server_rank_is_the_fastest_one_that_the_server_can_hold():
    """``server_rank=None``: every positive rank of Q is planned for and the plans that
    progress fastest kept; a main server too small for the wide ones gets the widest it
    holds; none at all is the smallest rank's error."""
    profiles = [_device(FLOOR * 3, flops=1e11), _device(ROOMY, flops=4e11), _device(10 * ROOMY)]
    gains = _importance(3)
    auto = PlannerSettings(server_rank=None)
    fixed = {r: plan_clients(profiles, SERVER, DIMS, gains, WORK, replace(auto, server_rank=r))
             for r in (2, 4, 8, 16)}
    planned = plan_clients(profiles, SERVER, DIMS, gains, WORK, auto)
    best = max(fixed.values(), key=lambda p: p.objective)
    assert planned.objective == best.objective
    assert planned.objective >= max(p.objective for p in fixed.values())
    chosen = {r for c in planned.clients for r in c.server_ranks.values()}
    assert len(chosen) == 1
    rank = chosen.pop()
    assert fixed[rank].objective == best.objective
    print(f"objective by server rank: {({r: round(p.objective, 4) for r, p in fixed.items()})}"
          f", planned {rank}")
    # a server that holds rank 4 for these clients but not rank 8
    need = {r: fixed[r].server.memory_bytes for r in fixed}
    assert need[4] < need[16]
    small = SERVER.model_copy(update={"memory_bytes": need[4]})
    limited = plan_clients(profiles, small, DIMS, gains, WORK, auto)
    assert limited.server.memory_bytes <= need[4]
    assert limited.objective == max(p.objective for r, p in fixed.items() if need[r] <= need[4])
    tiny = SERVER.model_copy(update={"memory_bytes": need[2] // 2})
    with pytest.raises(PlanError, match="main server"):
        plan_clients(profiles, tiny, DIMS, gains, WORK, auto)
