"""Heterogeneous split points and noise-free aggregation on a tiny Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hsplitlora import aggregate as agg
from hsplitlora.runtime.batches import batch_stream
from hsplitlora.runtime.optim import OptimSettings, causal_lm_loss
from hsplitlora.train.hetero import HeteroSystem, PartyPlan, run_hetero
from hsplitlora.train.recorder import Recorder
from tests.conftest import tiny_model


def _features(n: int, seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 300, (12,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return out


PLANS = [
    PartyPlan(1, {"model.layers.0.self_attn.q_proj": 2, "model.layers.2.self_attn.v_proj": 4,
                  "model.layers.3.mlp.down_proj": 4}),
    PartyPlan(2, {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.up_proj": 8,
                  "model.layers.3.mlp.down_proj": 2}),
    PartyPlan(3, {"model.layers.2.self_attn.v_proj": 1, "model.layers.1.mlp.up_proj": 2}),
]


def _system(aggregator: str = "noisefree", plans=PLANS, **kw) -> HeteroSystem:
    base = tiny_model("llama")
    shards = [_features(6 + 2 * i, seed=i) for i in range(len(plans))]
    streams = [batch_stream(s, 2, seed=i, pad_id=0) for i, s in enumerate(shards)]
    optim = OptimSettings(lr=2e-2, total_steps=10)
    torch.manual_seed(0)
    return HeteroSystem(base, plans, streams, [len(s) for s in shards], client_optim=optim,
                        server_optim=optim, alpha=8.0, aggregator=aggregator, precision="fp32",
                        **kw)


def _copies(system: HeteroSystem, module: str) -> list[torch.Tensor]:
    """Every copy of a module's base weight: clients that hold it, and server copies."""
    out = []
    holders = [c.segment for c in system.clients] + list(system.server.segments.values())
    for seg in holders:
        try:
            layer = seg.get_submodule(seg.local_name(module))
        except (KeyError, AttributeError):
            continue
        out.append(getattr(layer, "base_layer", layer).weight.detach())
    return out


def test_loss_before_any_update_does_not_depend_on_the_cut():
    system = _system()
    batch = next(batch_stream(_features(4, seed=9), 4, seed=0, pad_id=0))
    losses = []
    for client in system.clients:
        hidden = client.segment(batch["input_ids"], batch["attention_mask"])
        logits = system.server.segments[client.client_id](hidden, batch["attention_mask"])
        losses.append(float(causal_lm_loss(logits, batch["labels"])[0]))
    assert max(losses) - min(losses) < 1e-6, losses


def test_noisefree_aggregation_merges_the_exact_sum_into_every_copy():
    system = _system()
    rec = Recorder(None, 10, show_progress=False)
    run_hetero(system, steps=2, interval=100, rec=rec)  # train, aggregate only at the end...
    # ...but check the aggregation by hand: snapshot the exact weighted sum first.
    system2 = _system()
    for _ in range(2):
        for c in system2.clients:
            acts = c.forward()
            c.backward(system2.server.step(c.client_id, acts).grad)
    states = system2.participant_states()
    expected = agg.weighted_delta(states, [c.num_samples for c in system2.clients])
    before = {m: _copies(system2, m)[0].clone() for m in system2.candidates}
    system2.aggregate()
    assert set(expected) == {m for p in PLANS for m in p.ranks}
    for module in system2.candidates:
        copies = _copies(system2, module)
        assert len(copies) >= 2
        for other in copies[1:]:
            assert torch.equal(copies[0], other), module  # bit-identical everywhere
        want = before[module] + expected.get(module, 0)
        torch.testing.assert_close(copies[0], want, atol=1e-6, rtol=1e-5)
    # adapters restarted: B = 0, so the model is exactly base + merged update
    for state in system2.participant_states():
        assert all(float(pair.B.abs().max()) == 0 for pair in state.values())
    assert torch.equal(system2.base.model.layers[3].mlp.down_proj.weight,
                       _copies(system2, "model.layers.3.mlp.down_proj")[0])


def _train_locally(system: HeteroSystem, steps: int) -> None:
    for _ in range(steps):
        for c in system.clients:
            acts = c.forward()
            c.backward(system.server.step(c.client_id, acts).grad)


@pytest.mark.parametrize("aggregator", ["stack", "svd", "zeropad"])
def test_other_aggregators_train_and_keep_ranks(aggregator):
    system = _system(aggregator)
    rec = Recorder(None, 4, show_progress=False)
    run_hetero(system, steps=4, interval=2, rec=rec)
    for cid, state in enumerate(system.participant_states()):
        assert {m: p.rank for m, p in state.items()} == dict(PLANS[cid].ranks)
    aggs = [r for r in rec.records if r.get("event") == "aggregate"]
    assert len(aggs) == 2 and all(a["bytes_up"] > 0 and a["bytes_down"] > 0 for a in aggs)


@pytest.mark.parametrize("aggregator", ["stack", "svd", "zeropad"])
def test_a_trained_system_aggregates_what_its_method_says(aggregator):
    # Train, snapshot every participant's adapters, aggregate, and check the system
    # against the pure function applied to the snapshot.
    system = _system(aggregator)
    _train_locally(system, 2)
    states = system.participant_states()
    weights = [c.num_samples for c in system.clients]
    assert all(float(p.B.abs().max()) > 0 for state in states for p in state.values())
    before = {m: _copies(system, m)[0].clone() for m in system.candidates}
    system.aggregate()
    after = system.participant_states()
    if aggregator == "stack":  # merged into every copy, adapters restarted
        expected = agg.weighted_delta(states, weights)
        for module in system.candidates:
            for copy_ in _copies(system, module):
                torch.testing.assert_close(copy_, before[module] + expected.get(module, 0),
                                           atol=1e-6, rtol=1e-5)
        assert all(float(p.B.abs().max()) == 0 for state in after for p in state.values())
        return
    want = (agg.svd(states, weights)[0] if aggregator == "svd"
            else agg.zeropad(states, weights))
    for got, exp in zip(after, want, strict=True):
        assert set(got) == set(exp)
        for module in exp:
            torch.testing.assert_close(agg.delta(got[module]), agg.delta(exp[module]),
                                       atol=1e-6, rtol=1e-5)
    for module in system.candidates:  # nothing merged: the base weights are untouched
        assert all(torch.equal(c, before[module]) for c in _copies(system, module))


def test_the_exported_adapter_reproduces_the_trained_split_model():
    # The model that ran (a participant's client segment into its server segment, on the
    # merged base) against the untouched base plus the exported update.
    from hsplitlora.models.lora import updates_as_adapter

    system = _system()
    run_hetero(system, steps=2, interval=1, rec=Recorder(None, 2, show_progress=False))
    batch = next(batch_stream(_features(4, seed=9), 4, seed=0, pad_id=0))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ran = [system.server.segments[c.client_id](c.segment(ids, mask), mask)
               for c in system.clients]
    state, alphas = updates_as_adapter(system.global_update())
    base = tiny_model("llama").eval()  # the original weights (same seed)
    with torch.no_grad():
        untuned = base(input_ids=ids, attention_mask=mask).logits
        for module, alpha in alphas.items():
            A, B = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
            base.get_submodule(module).weight += (alpha / A.shape[0]) * (B @ A)
        exported = base(input_ids=ids, attention_mask=mask).logits
    for logits in ran:
        torch.testing.assert_close(exported, logits, atol=1e-5, rtol=0)
    assert (exported - untuned).abs().max() > 1e-3


def test_fedavg_refuses_mixed_ranks():
    system = _system("fedavg")
    with pytest.raises(ValueError, match="fedavg needs (one|every client to adapt the same)"):
        system.aggregate()


def test_replan_moves_the_cut_and_keeps_the_merged_model():
    system = _system()
    for c in system.clients:
        acts = c.forward()
        c.backward(system.server.step(c.client_id, acts).grad)
    system.aggregate()
    batch = next(batch_stream(_features(4, seed=9), 4, seed=0, pad_id=0))

    def loss_of(cid):
        c = system.clients[cid]
        h = c.segment(batch["input_ids"], batch["attention_mask"])
        return float(causal_lm_loss(system.server.segments[cid](h, batch["attention_mask"]),
                                    batch["labels"])[0])

    before = loss_of(0)
    new = copy.deepcopy(PLANS)
    new[0] = PartyPlan(3, {"model.layers.1.mlp.up_proj": 4})
    system.replan(new)
    assert system.clients[0].cut == 3 and system.server.cut(0) == 3
    assert abs(loss_of(0) - before) < 1e-5


@pytest.mark.parametrize("aggregator", ["noisefree", "svd"])
def test_an_aggregation_charges_each_client_link_only_what_crosses_it(aggregator):
    """A client uploads its own adapters and downloads what concerns the blocks it holds;
    the server-side adapters move between the main and the fed server, on no client's
    link. The figures are the bytes of the tensors themselves."""
    from hsplitlora.roles.messages import nbytes

    system = _system(aggregator)
    for c in system.clients:
        c.backward(system.server.step(c.client_id, c.forward()).grad)
    uploads = {c.client_id: nbytes(c.adapter_state()) for c in system.clients}
    server = sum(nbytes(system.server.adapter_state(c.client_id)) for c in system.clients)
    moved = system.aggregate()
    assert [cid for cid, _, _ in moved.links] == [0, 1, 2]
    assert {cid: up for cid, up, _ in moved.links} == uploads
    assert moved.server_up == server and server > 0
    if aggregator == "noisefree":  # each client gets the merged update of its own blocks
        update = system.merges[-1]
        for cid, _, down in moved.links:
            cut = PLANS[cid].cut
            held = [u for m, u in update.items() if int(m.split(".")[2]) < cut]
            assert down == sum(nbytes(u) if isinstance(u, torch.Tensor) else nbytes(list(u))
                               for u in held), cid
        assert moved.server_down == sum(
            nbytes(u) if isinstance(u, torch.Tensor) else nbytes(list(u))
            for u in update.values())
    else:  # each client gets back its own new adapters
        assert {cid: down for cid, _, down in moved.links} == {
            c.client_id: nbytes(c.adapter_state()) for c in system.clients}
        assert moved.server_down == sum(nbytes(system.server.adapter_state(c.client_id))
                                        for c in system.clients)


def _lora(segment) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in segment.named_full_parameters() if "lora" in n}


def test_a_shared_server_side_is_one_adapter_trained_by_every_client_that_reaches_it():
    system = _system(shared_server=True)
    views = system.server.segments
    # one adapter per block: block 3's server adapter is the same tensor in every view
    tensors = [dict(v.named_full_parameters()) for v in views.values()]
    name = "model.layers.3.mlp.down_proj.lora_B.default.weight"
    assert len({t[name].data_ptr() for t in tensors}) == 1
    # at every matrix the largest rank a plan gives it on the server side (0: none)
    widest = views[0]
    assert dict(system.settings(0, "server").ranks) == system.settings(2, "server").ranks
    assert {m: r for m, r in system.settings(1, "server").ranks.items() if r} == {
        "model.layers.2.self_attn.v_proj": 4, "model.layers.3.mlp.down_proj": 4}
    # client 0 (cut 1) trains blocks 1-3 on the server; client 2 (cut 3) only block 3
    c0, c2 = system.clients[0], system.clients[2]
    c0.backward(system.server.step(0, c0.forward()).grad)
    after0 = _lora(widest)
    c2.backward(system.server.step(2, c2.forward()).grad)
    after2 = _lora(widest)
    for n in after0:
        moved = not torch.equal(after0[n], after2[n])
        assert moved == (".layers.3." in n), n


def _moments(system: HeteroSystem) -> dict[str, torch.Tensor]:
    """The shared server side's AdamW first moments, by adapter parameter name."""
    opt = system.server.optimizers[0].opt
    return {n: opt.state[p]["exp_avg"].clone()
            for n, p in system.server.segments[0].named_full_parameters()
            if "lora" in n and p in opt.state}


def test_with_a_shared_server_side_noisefree_merges_the_exact_sum_by_block():
    """Each block's update: the clients that hold it weighted by their shards, plus the
    shared server adapter weighted by the shards of the clients whose server side reaches
    that block (so the weights add up to the whole data). Behind the deepest cut (block
    3) only the shared adapter trains: nothing is merged there, and it trains on with its
    values and AdamW moments, while every other adapter restarts."""
    system = _system(shared_server=True)
    _train_locally(system, 2)
    n = [c.num_samples for c in system.clients]
    cuts = [p.cut for p in PLANS]
    server = agg.from_peft_state_dict(system.server.adapter_state(0), system.alpha)
    clients = [agg.from_peft_state_dict(c.adapter_state(), system.alpha) for c in system.clients]
    before = {m: _copies(system, m)[0].clone() for m in system.candidates}
    lora_before, moments_before = _lora(system.server.segments[0]), _moments(system)
    held = system.server_held()
    assert held == {m for m in system.candidates if ".layers.3." in m}
    system.aggregate()
    checked = 0
    for module in system.candidates:
        block = system.spec.block_of(module)
        copies = _copies(system, module)
        assert all(torch.equal(copies[0], c) for c in copies[1:]), module
        if module in held:
            assert torch.equal(copies[0], before[module]), module
            continue
        parts = [(n[i], clients[i][module]) for i in range(3) if module in clients[i]]
        if module in server:
            parts.append((sum(n[i] for i in range(3) if cuts[i] <= block), server[module]))
        if not parts:
            continue
        total = sum(w for w, _ in parts)
        want = sum(w / total * agg.delta(pair) for w, pair in parts)
        torch.testing.assert_close(copies[0], before[module] + want, atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked >= 3
    after, moments = _lora(system.server.segments[0]), _moments(system)
    kept = {name for name in after if ".layers.3." in name}
    assert kept and any(float(lora_before[k].abs().max()) > 0 for k in kept if "lora_B" in k)
    for name, value in after.items():
        if name in kept:  # the same adapter, and the same moments, as before
            assert torch.equal(value, lora_before[name]), name
            assert torch.equal(moments[name], moments_before[name]), name
        else:  # restarted: adds nothing now, and its AdamW starts afresh
            assert name not in moments, name
            if "lora_B" in name:
                assert float(value.abs().max()) == 0, name
    # the global model: what was merged plus the held adapter, exactly
    update = system.global_update()
    held_module = "model.layers.3.mlp.down_proj"
    assert torch.equal(update[held_module], agg.delta(server[held_module]).float())


def test_the_evaluated_global_model_is_the_split_model_after_an_aggregation():
    """Right after an aggregation every adapter but the server-held ones adds nothing,
    so the unsplit base with :meth:`unmerged` added (what the run evaluates) computes
    what the split parties compute."""
    from hsplitlora.models.lora import base_weights
    from hsplitlora.models.shared import added

    system = _system(shared_server=True)
    _train_locally(system, 2)
    system.aggregate()
    batch = next(batch_stream(_features(4, seed=9), 4, seed=0, pad_id=0))
    client = system.clients[0]
    hidden = client.segment(batch["input_ids"], batch["attention_mask"])
    split = causal_lm_loss(system.server.segments[0](hidden, batch["attention_mask"]),
                           batch["labels"])[0]
    extra = system.unmerged()
    assert extra is not None and set(extra.deltas) == {"model.layers.3.mlp.down_proj"}

    def unsplit() -> torch.Tensor:
        with torch.no_grad():
            logits = system.base(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
        return causal_lm_loss(logits, batch["labels"])[0]

    plain = unsplit()
    with added(base_weights(system.base, extra.deltas), extra.deltas):
        torch.testing.assert_close(unsplit(), split.detach(), atol=1e-5, rtol=1e-5)
    assert abs(float(plain) - float(split)) > 1e-4  # the held adapter matters
    assert torch.equal(unsplit(), plain)  # and the base is as it was


@pytest.mark.parametrize("aggregator", ["zeropad", "svd"])
def test_a_shared_server_side_takes_part_in_a_non_merging_aggregation_by_block(aggregator):
    """With HetLoRA's zero-padding (or FlexLoRA's SVD) the shared server side is one more
    participant of each block range it serves, weighted by the shards of the clients
    whose server side reaches it, as under noise-free merging: it gets back its rank's
    share of the global model and the clients theirs, with fresh AdamW moments; behind
    the deepest cut its adapter and moments go on untouched. So the ablation "NAA
    off" changes the aggregator only, not the server side."""
    system = _system(aggregator, shared_server=True)
    _train_locally(system, 2)
    n = [c.num_samples for c in system.clients]
    module = "model.layers.2.self_attn.v_proj"  # client 0's server side (rank 4), client 2
    server = agg.from_peft_state_dict(system.server.adapter_state(0), system.alpha)
    clients = [agg.from_peft_state_dict(c.adapter_state(), system.alpha) for c in system.clients]
    assert server[module].rank == 4 and clients[2][module].rank == 1
    states = [*clients, {module: server[module]}]
    weights = [*n, n[0] + n[1]]  # the clients at cuts 1 and 2 reach block 2 on the server
    want = (agg.zeropad(states, weights) if aggregator == "zeropad"
            else agg.svd(states, weights)[0])
    lora_before, moments_before = _lora(system.server.segments[0]), _moments(system)
    system.aggregate()
    got = agg.from_peft_state_dict(system.server.adapter_state(0), system.alpha)
    for side, expected in [(got, want[3]), *[
            (agg.from_peft_state_dict(c.adapter_state(), system.alpha), want[i])
            for i, c in enumerate(system.clients)]]:
        for m, pair in expected.items():
            torch.testing.assert_close(side[m].A, pair.A, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(side[m].B, pair.B, atol=1e-6, rtol=1e-5)
    assert float(got[module].B.abs().max()) > 0
    after, moments = _lora(system.server.segments[0]), _moments(system)
    for name, value in after.items():
        if ".layers.3." in name:  # held: the same adapter and moments as before
            assert torch.equal(value, lora_before[name]), name
            assert torch.equal(moments[name], moments_before[name]), name
        else:
            assert name not in moments, name
    # the global model: the method's, and the held adapter, which no aggregation covers
    held_module = "model.layers.3.mlp.down_proj"
    update = system.global_update()
    assert torch.equal(update[held_module], agg.delta(server[held_module]).float())
    assert module in update and module in system.global_model


@pytest.mark.parametrize("aggregator,shared", [("noisefree", True), ("zeropad", False),
                                                ("svd", False), ("zeropad", True)])
def test_a_mid_run_evaluation_sees_the_model_the_run_exports(aggregator, shared):
    """What the run evaluates after an aggregation (the base with :meth:`unmerged`
    added) is the model it would export at that point: the pristine base with the
    global update as a PEFT adapter. HetLoRA's and FlexLoRA's base stays pristine, so
    there the whole global model is added (rank ``r_max``; the exact weighted update)."""
    from hsplitlora.models.lora import (
        LoraSettings,
        attach_lora,
        base_weights,
        load_lora_state,
        updates_as_adapter,
    )
    from hsplitlora.models.shared import added

    system = _system(aggregator, shared_server=shared)
    _train_locally(system, 2)
    system.aggregate()
    batch = next(batch_stream(_features(4, seed=9), 4, seed=0, pad_id=0))

    def loss(model) -> float:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
        return float(causal_lm_loss(logits, batch["labels"])[0])

    extra = system.unmerged()
    assert extra is not None
    with added(base_weights(system.base, extra.deltas), extra.deltas):
        evaluated = loss(system.base)
    state, alphas = updates_as_adapter(system.global_update())
    ranks = {k.removesuffix(".lora_A.weight"): int(v.shape[0])
             for k, v in state.items() if k.endswith(".lora_A.weight")}
    pristine = tiny_model("llama")  # _system's base before any merge
    attach_lora(pristine, LoraSettings(r=max(ranks.values()), alpha=8.0,
                                       targets=system.spec.targets, ranks={
        **{m: 0 for m in system.candidates}, **ranks}, alphas=alphas))
    load_lora_state(pristine, state)
    assert abs(evaluated - loss(tiny_model("llama"))) > 1e-4  # the adapters matter
    assert evaluated == pytest.approx(loss(pristine), abs=1e-5)


def test_a_replan_folds_the_server_held_adapters_into_the_base_first():
    """A re-plan restarts every adapter and may change the held blocks' ranks or hand
    them to a client: what the shared adapter learned there is merged first (one more
    merge, as exact as an aggregation's), so the global model loses nothing."""
    system = _system(shared_server=True)
    _train_locally(system, 2)
    system.aggregate()
    module = "model.layers.3.mlp.down_proj"
    learned = agg.delta(agg.from_peft_state_dict(system.server.adapter_state(0),
                                                 system.alpha)[module]).float()
    base = _copies(system, module)[0].clone()
    version = system.version
    global_before = system.global_update()[module]
    new = copy.deepcopy(PLANS)
    new[0] = PartyPlan(1, {**PLANS[0].ranks, module: 8})  # a wider held adapter
    system.replan(new)
    assert system.version == version + 1
    assert system.settings(0, "server").rank_of(module) == 8
    copies = _copies(system, module)
    assert all(torch.equal(copies[0], c) for c in copies[1:])
    torch.testing.assert_close(copies[0], base + learned, atol=1e-6, rtol=1e-5)
    assert float(agg.from_peft_state_dict(system.server.adapter_state(0), system.alpha)[
        module].B.abs().max()) == 0
    torch.testing.assert_close(system.global_update()[module], global_before)


def test_a_shared_server_side_refuses_an_aggregator_of_one_rank():
    with pytest.raises(ValueError, match="a shared server side needs an aggregator it can "
                                         "take part in .* not 'fedavg'"):
        _system("fedavg", shared_server=True)


def test_a_shared_server_side_follows_a_replan_to_new_cuts():
    system = _system(shared_server=True)
    _train_locally(system, 1)
    system.aggregate()
    new = copy.deepcopy(PLANS)
    new[0] = PartyPlan(2, {"model.layers.1.mlp.up_proj": 4})  # the shallowest cut moves
    system.replan(new)
    assert [system.server.cut(c) for c in range(3)] == [2, 2, 3]
    views = system.server.segments.values()
    name = "model.layers.3.mlp.down_proj.lora_A.default.weight"
    assert len({dict(v.named_full_parameters())[name].data_ptr() for v in views}) == 1
    _train_locally(system, 1)  # and it trains from there


# --- a U-shaped split (train.tail) in the heterogeneous system ------------------------------

# Cuts up to 2: a tail of 1 (block 3, the head, the loss) leaves the server a block. No
# adapter on block 3, so with or without the tail every adapter starts the same.
HEAD_PLANS = [
    PartyPlan(1, {"model.layers.0.self_attn.q_proj": 2, "model.layers.2.self_attn.v_proj": 4}),
    PartyPlan(2, {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.up_proj": 8,
                  "model.layers.2.self_attn.v_proj": 2}),
    PartyPlan(2, {"model.layers.1.mlp.up_proj": 2}),
]
TAIL_PLANS = [PartyPlan(p.cut, {**p.ranks, "model.layers.3.mlp.down_proj": 2 + 2 * i})
              for i, p in enumerate(HEAD_PLANS)]


def _probes(n: int = 3) -> list:
    return [batch_stream(_features(6, seed=50 + i), 2, seed=i, pad_id=0) for i in range(n)]


@pytest.mark.parametrize(("aggregator", "shared"), [("noisefree", True), ("noisefree", False),
                                                    ("svd", False)])
def test_a_u_shaped_system_trains_exactly_as_the_plain_one(aggregator, shared):
    """The tail is exact: same losses at every step, same global model, while the steps
    move the U-shaped bytes (no labels up; the tail's round trip both ways)."""
    runs = []
    for tail in (0, 1):
        system = _system(aggregator, plans=HEAD_PLANS, shared_server=shared, tail=tail)
        rec = Recorder(None, 4, show_progress=False)
        run_hetero(system, steps=4, interval=2, rec=rec)
        runs.append((system, [r for r in rec.records if "event" not in r]))
    (plain, plain_steps), (u, u_steps) = runs
    torch.testing.assert_close([r["loss"] for r in u_steps], [r["loss"] for r in plain_steps],
                               atol=1e-5, rtol=0)
    want, got = plain.global_update(), u.global_update()
    assert set(got) == set(want) and len(got) >= 3
    for m in want:
        torch.testing.assert_close(got[m], want[m], atol=1e-6, rtol=1e-5)
    hidden = 2 * 12 * 32 * 4  # a batch of 2 x 12 tokens, fp32
    for a, b in zip(plain_steps, u_steps, strict=True):
        assert a["bytes_up"] == hidden + 2 * 12 * 8 * 2 and a["bytes_down"] == hidden
        assert b["bytes_up"] == 2 * hidden + 2 * 12 * 8 and b["bytes_down"] == 2 * hidden
    # the server runs the middle only: no head, nothing from block 3 on
    assert all(s.lm_head is None and max(s.block_range) == 2 for s in u.server.segments.values())


def test_a_u_shaped_clients_tail_is_its_own_and_merges_as_every_client_holds_it():
    system = _system(plans=TAIL_PLANS, tail=1)
    _train_locally_u(system, 2)
    tail = "model.layers.3.mlp.down_proj"
    states = [agg.from_peft_state_dict(c.adapter_state(), system.alpha) for c in system.clients]
    assert all(tail in s for s in states)  # every client holds and trains its tail
    assert [states[i][tail].rank for i in range(3)] == [2, 4, 6]
    assert all(float(s[tail].B.abs().max()) > 0 for s in states)
    assert all(tail + ".lora_A.weight" in system.client_layout(c) for c in range(3))
    n = [c.num_samples for c in system.clients]
    want = sum(n[i] / sum(n) * agg.delta(states[i][tail]) for i in range(3))
    before = system.base.model.layers[3].mlp.down_proj.weight.detach().clone()
    moved = system.aggregate()
    torch.testing.assert_close(system.base.model.layers[3].mlp.down_proj.weight,
                               before + want, atol=1e-6, rtol=1e-5)
    # each client's tail holds the merged weight too (one base per process), and its link
    # carried its whole adapter, tail included, up
    for c in system.clients:
        layer = c.tail.get_submodule(c.tail.local_name(tail))
        assert torch.equal(getattr(layer, "base_layer", layer).weight,
                           system.base.model.layers[3].mlp.down_proj.weight)
    for cid, up, down in moved.links:
        assert up == sum(4 * math.prod(s) for s in system.client_layout(cid).values())
        assert down > 0


def _train_locally_u(system: HeteroSystem, steps: int) -> None:
    from hsplitlora.train.engine import client_step

    rec = Recorder(None, steps, show_progress=False)
    for t in range(steps):
        for c in system.clients:
            assert client_step(c, system.server, rec, t)


def test_u_shaped_probing_scores_the_tail_on_the_client_and_sends_no_labels():
    """Probing at the provisional plans (no adapters): the energies of every matrix,
    the tail's included, equal the plain system's, and what crossed is the U-shaped
    round trip without labels."""
    from hsplitlora.hetero.planner import probe_importance

    provisional = [PartyPlan(1) for _ in range(3)]
    scores = []
    for tail in (0, 1):
        system = _system(plans=provisional, tail=tail, probes=_probes())
        scores.append(probe_importance(system, 1, "fp32"))
    (plain, plain_links), (u, u_links) = scores
    assert set(u) == set(plain) and any(".layers.3." in k for k in u)
    for k in plain:
        assert u[k] == pytest.approx(plain[k], rel=1e-5, abs=1e-12), k
    hidden = 2 * 12 * 32 * 4
    assert [link[1:] for link in plain_links] == [[hidden + 2 * 2 * 12 * 8, hidden, 1, 1]] * 3
    assert [link[1:] for link in u_links] == [[2 * hidden + 2 * 12 * 8, 2 * hidden, 1, 1]] * 3


def test_a_u_shaped_system_follows_a_replan_and_keeps_its_tail():
    system = _system(plans=TAIL_PLANS, shared_server=True, tail=1)
    _train_locally_u(system, 1)
    system.aggregate()
    new = copy.deepcopy(TAIL_PLANS)
    new[0] = PartyPlan(2, {"model.layers.1.mlp.up_proj": 4, "model.layers.3.mlp.down_proj": 8})
    system.replan(new)
    assert [system.server.cut(c) for c in range(3)] == [2, 2, 2]
    tail = agg.from_peft_state_dict(system.clients[0].adapter_state(), system.alpha)
    assert tail["model.layers.3.mlp.down_proj"].rank == 8
    _train_locally_u(system, 1)  # and it trains from there


def test_a_u_shaped_split_needs_a_server():
    with pytest.raises(ValueError, match="hetero.federated runs no server"):
        _system(plans=HEAD_PLANS, tail=1, federated=True)
