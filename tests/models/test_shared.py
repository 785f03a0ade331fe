"""One frozen base per process: shared storage, merges applied once and kept exact."""

from __future__ import annotations

import copy
import pickle

import torch

from hsplitlora.models.lora import LoraSettings, attach_lora, base_weights, merge_base_update
from hsplitlora.models.shared import (
    added,
    adopt_merges,
    merge_into,
    merge_state,
    merge_states,
    merged_delta,
    restore_original,
    set_delta,
    share_frozen,
)
from hsplitlora.models.split import split_model
from tests.conftest import tiny_model


def _frozen(module):
    return {n.replace(".base_layer", ""): p for n, p in module.named_parameters()
            if ".lora_" not in n}


def test_share_frozen_shares_every_base_tensor_and_copies_the_adapters():
    model = attach_lora(tiny_model("llama"), LoraSettings(r=2, alpha=4))
    twin = share_frozen(model)
    ours, theirs = _frozen(model), _frozen(twin)
    assert ours.keys() == theirs.keys() and ours
    assert all(theirs[n].data_ptr() == p.data_ptr() for n, p in ours.items())
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    twin_lora = dict((n, p) for n, p in twin.named_parameters() if ".lora_" in n)
    assert lora.keys() == twin_lora.keys()
    for n, p in lora.items():
        assert torch.equal(p, twin_lora[n]) and p.data_ptr() != twin_lora[n].data_ptr()
    with torch.no_grad():  # the copy's adapters are its own
        next(iter(twin_lora.values())).add_(1.0)
    assert not torch.equal(next(iter(lora.values())), next(iter(twin_lora.values())))


def test_split_segments_hold_the_models_own_frozen_tensors():
    for arch in ("llama", "gpt2"):  # GPT-2: the tied head stays tied to the one embedding
        model = attach_lora(tiny_model(arch), LoraSettings(r=2, alpha=4))
        client, server = split_model(model, 2)
        ptrs = {p.data_ptr() for n, p in model.named_parameters() if ".lora_" not in n}
        for seg in (client, server):
            held = [p for n, p in seg.named_parameters() if ".lora_" not in n]
            assert held and all(p.data_ptr() in ptrs for p in held)
        assert server.lm_head.weight.data_ptr() in ptrs


def test_a_merge_applies_once_per_version_however_many_parties_share_the_weight():
    model = tiny_model("llama")
    a, b = share_frozen(model), share_frozen(model)
    name = "model.layers.0.self_attn.q_proj"
    before = model.get_submodule(name).weight.detach().clone()
    update = torch.randn_like(before) * 1e-2
    for party in (model, a, b):  # every party applies aggregation 1
        merge_base_update(party, {name: update}, 1)
    after = model.get_submodule(name).weight
    torch.testing.assert_close(after, before + update, atol=0, rtol=0)
    assert merge_base_update(a, {name: update}, 1) == [name]  # held, but not applied again
    torch.testing.assert_close(after, before + update, atol=0, rtol=0)
    merge_base_update(b, {name: update}, 2)
    torch.testing.assert_close(after, before + (update + update), atol=0, rtol=0)
    assert merge_state(after).version == 2


def test_bf16_weights_keep_every_merged_update_exactly_beside_them():
    """An update far below a bf16 weight's resolution changes nothing stored, yet it is
    kept: the sum of updates lives in fp32 and the weight is round(original + sum)."""
    w = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16), requires_grad=False)
    tiny = torch.full((4, 4), 1e-4)
    for v in range(1, 101):
        merge_into(w, tiny, v)
        if v == 1:
            assert torch.equal(w, torch.ones(4, 4, dtype=torch.bfloat16))  # rounded away
    torch.testing.assert_close(merged_delta(w), torch.full((4, 4), 1e-2), atol=1e-7, rtol=0)
    assert torch.equal(w, torch.full((4, 4), 1.01).bfloat16())  # a hundred of them add up
    restore_original({"w": w})
    assert torch.equal(w, torch.ones(4, 4, dtype=torch.bfloat16)) and merge_state(w) is None


def test_an_added_update_reads_as_merged_and_leaves_every_weight_as_it_was():
    """For an evaluation of a global model partly not merged: inside, the weight is
    round(original + merged + extra), exactly as merging it would make it; after, every
    bit and the merge state are back."""
    merged = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16), requires_grad=False)
    plain = torch.nn.Parameter(torch.full((4, 4), 2.0, dtype=torch.bfloat16),
                               requires_grad=False)
    for v in range(1, 51):
        merge_into(merged, torch.full((4, 4), 1e-4), v)  # 5e-3: kept, not yet stored
    stored, extra = merged.detach().clone(), torch.full((4, 4), 6e-3)
    twin = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16), requires_grad=False)
    merge_into(twin, torch.full((4, 4), 5e-3), 1)
    merge_into(twin, extra, 2)  # what merging the extra would store
    with added({"merged": merged, "plain": plain}, {"merged": extra, "plain": extra}):
        assert torch.equal(merged, twin)
        assert torch.equal(plain, (torch.full((4, 4), 2.0) + extra).bfloat16())
    assert torch.equal(merged, stored) and torch.equal(plain, torch.full((4, 4), 2.0).bfloat16())
    assert merge_state(merged).version == 50 and merge_state(plain) is None
    torch.testing.assert_close(merged_delta(merged), torch.full((4, 4), 5e-3), atol=1e-7,
                               rtol=0)


def test_merge_states_travel_with_a_copy_and_catching_up_is_exact():
    model = tiny_model("llama")
    name = "model.layers.1.mlp.up_proj"
    u1, u2 = (torch.randn(64, 32) * 1e-2 for _ in range(2))
    merge_base_update(model, {name: u1}, 1)
    far = pickle.loads(pickle.dumps(model))  # another process: values merged, states not
    adopt_merges(far, merge_states(model))
    for m in (model, far):
        merge_base_update(m, {name: u2}, 2)
    assert torch.equal(far.get_submodule(name).weight, model.get_submodule(name).weight)
    # a party that never held the weight catches up from its pristine copy and the delta
    fresh = tiny_model("llama")
    (weight,) = base_weights(fresh, [name]).values()
    set_delta(weight, merged_delta(model.get_submodule(name).weight), 2)
    assert torch.equal(weight, model.get_submodule(name).weight)


def test_deep_copies_do_not_inherit_merge_states():
    model = tiny_model("llama")
    name = "model.layers.0.self_attn.v_proj"
    merge_base_update(model, {name: torch.ones(16, 32)}, 1)
    clone = copy.deepcopy(model)
    assert merge_state(clone.get_submodule(name).weight) is None


def test_restarting_adapters_in_place_draws_what_a_fresh_attach_draws():
    from hsplitlora.models.lora import lora_state, restart_lora, strip_lora

    ranks = {f"model.layers.{b}.self_attn.{m}": r for b in range(4)
             for m, r in (("q_proj", 2), ("v_proj", 4))}
    first = LoraSettings(r=4, alpha=8, ranks=ranks, init_seed=11)
    again = LoraSettings(r=4, alpha=8, ranks=ranks, init_seed=12)
    for arch in ("llama", "gpt2"):
        if arch == "gpt2":
            first = again = LoraSettings(r=2, alpha=4, init_seed=5)
            again = LoraSettings(r=2, alpha=4, init_seed=6)
        model = attach_lora(tiny_model(arch), first)
        params = [p for n, p in model.named_parameters() if ".lora_" in n]
        with torch.no_grad():
            for p in params:
                p.add_(0.5)  # trained
        restart_lora(model, again)
        reference = strip_lora(attach_lora(tiny_model(arch), first))
        attach_lora(reference, again)
        got, want = lora_state(model), lora_state(reference)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (arch, k)
        assert [p for n, p in model.named_parameters() if ".lora_" in n] == params  # in place
        assert all(torch.equal(v, torch.zeros_like(v)) for k, v in got.items() if "lora_B" in k)
    # adapters to keep go on as they are; the others get what a fresh attach draws
    first = LoraSettings(r=4, alpha=8, ranks=ranks, init_seed=11)
    again = LoraSettings(r=4, alpha=8, ranks=ranks, init_seed=12)
    model = attach_lora(tiny_model("llama"), first)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.add_(0.5)
    kept = {"model.layers.1.self_attn.v_proj", "model.layers.3.self_attn.q_proj"}
    fresh_again = lora_state(attach_lora(strip_lora(attach_lora(tiny_model("llama"), first)),
                                         again))
    trained = lora_state(model)
    restart_lora(model, again, keep=kept)
    got = lora_state(model)
    for k, v in got.items():
        want = trained[k] if k.rsplit(".lora_", 1)[0] in kept else fresh_again[k]
        assert torch.equal(v, want), k
    from hsplitlora.models.lora import lora_parameters

    skipped = lora_parameters(model, skip=kept)
    assert len(skipped) == len(lora_parameters(model)) - 2 * len(kept)
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any(any(m.replace("model.", "") in names[id(p)] for m in kept) for p in skipped)
    # a different plan is attached anew
    model = attach_lora(tiny_model("llama"), first)
    restart_lora(model, LoraSettings(r=3, alpha=8, init_seed=12))
    assert {v.shape[0] for k, v in lora_state(model).items() if "lora_A" in k} == {3}
