import math

import pytest
import torch

from hsplitlora.hetero.importance import (
    GAIN_RANKS,
    ImportanceTracker,
    SensitivityProbe,
    ServerScorer,
    candidates,
    fuse_parts,
    global_importance_by_block,
    importance,
    module_energy,
    rank_energies,
    rank_gains,
    ranking,
    relative_costs,
    score_client,
    score_model,
    score_server,
    segment_importance,
)
from hsplitlora.models.lora import LoraSettings, attach_lora, lora_parameters
from hsplitlora.models.split import split_model
from hsplitlora.roles.messages import Activations
from hsplitlora.runtime.optim import causal_lm_loss
from tests.conftest import tiny_model

LAYERS = 4


def _batches(n: int = 2, rows: int = 3, seq: int = 12, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 320, (rows, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, seq - 4:] = 0  # right padding
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100  # a prompt without loss
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _model(arch: str, lora: bool = False) -> torch.nn.Module:
    model = tiny_model(arch, LAYERS)
    if lora:
        attach_lora(model, LoraSettings(r=4, alpha=8, targets=None))
        with torch.no_grad():  # B starts at zero; make the adapters change the gradients
            for p in lora_parameters(model):
                p.normal_(std=0.2)
    return model


def _reference(model: torch.nn.Module, batches: list[dict]) -> tuple[dict, dict]:
    """Part and whole-module scores straight from autograd on the full weight gradients."""
    cands = candidates(model)
    modules = list(dict.fromkeys(c.module for c in cands))
    weights = {}
    for m in modules:
        layer = model.get_submodule(m)
        weights[m] = getattr(layer, "base_layer", layer).weight
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for w in weights.values():
        w.requires_grad_(True)
    parts: dict[str, float] = dict.fromkeys((c.name for c in cands), 0.0)
    whole: dict[str, float] = dict.fromkeys(modules, 0.0)
    model.eval()
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        grads = torch.autograd.grad(causal_lm_loss(logits, b["labels"])[0],
                                    list(weights.values()))
        for (m, w), g in zip(weights.items(), grads, strict=True):
            prod = (w.detach() * g).abs()
            if type(getattr(model.get_submodule(m), "base_layer", model.get_submodule(m))
                    ).__name__ == "Conv1D":
                prod = prod.T  # GPT-2 stores (in, out); parts are slices of the output
            whole[m] += float(prod.mean()) / len(batches)
            own = [c for c in cands if c.module == m]
            width = prod.shape[0] // len(own)
            for i, c in enumerate(own):
                parts[c.name] += float(prod[i * width:(i + 1) * width].mean()) / len(batches)
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    return parts, whole


def _assert_rel_close(got: dict, want: dict, rtol: float = 1e-5) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=rtol, abs=1e-12), name


def test_candidates_are_every_targetable_matrix_with_gpt2_parts():
    llama = candidates(tiny_model("llama", LAYERS))
    assert len(llama) == 7 * LAYERS
    assert [c.name for c in llama[:7]] == [
        f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj",
                                        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                        "mlp.up_proj", "mlp.down_proj")]
    dims = {c.name.split(".", 3)[3]: (c.d_in, c.d_out) for c in llama if c.block == 2}
    assert dims["self_attn.k_proj"] == (32, 16)  # 2 kv heads of 8
    assert dims["mlp.down_proj"] == (64, 32)
    assert [c.block for c in llama] == [b for b in range(LAYERS) for _ in range(7)]

    gpt2 = candidates(tiny_model("gpt2", LAYERS))
    assert [c.name for c in gpt2[:6]] == [
        "transformer.h.0.attn.c_attn:q", "transformer.h.0.attn.c_attn:k",
        "transformer.h.0.attn.c_attn:v", "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert gpt2[0].module == "transformer.h.0.attn.c_attn"
    assert (gpt2[0].d_in, gpt2[0].d_out) == (32, 32)  # one third of the fused (32 -> 96)
    assert (gpt2[4].d_in, gpt2[4].d_out) == (32, 128)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("lora", [False, True])
def test_scores_equal_the_autograd_weight_gradient(arch, lora):
    model = _model(arch, lora)
    batches = _batches()
    scores = score_model(model, batches)
    parts, whole = _reference(model, batches)
    _assert_rel_close(scores, parts)
    _assert_rel_close(fuse_parts(scores, candidates(model)), whole)
    assert all(v > 0 for v in scores.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_split_scores_equal_the_unsplit_model_for_every_cut(arch):
    model = _model(arch, lora=True)
    batches = _batches()
    want = score_model(model, batches)
    for cut in range(LAYERS + 1):
        client, server = split_model(model, cut)
        with ServerScorer(server) as main_server:
            client_scores = score_client(client, batches, main_server)
        server_scores = main_server.scores()
        assert {c.block for c in candidates(client)} == set(range(cut))
        assert set(client_scores) == {c.name for c in candidates(client)}
        assert set(server_scores) == {c.name for c in candidates(server)}
        both = {**client_scores, **server_scores}
        _assert_rel_close({n: both[n] for n in want}, want)


def test_server_scores_uploads_it_received():
    model = _model("llama")
    batches = _batches()
    client, server = split_model(model, 0)
    with torch.no_grad():
        uploads = [Activations(client(b["input_ids"], b["attention_mask"]),
                               b["attention_mask"], b["labels"]) for b in batches]
    _assert_rel_close(score_server(server, uploads), score_model(model, batches))


def _state(module: torch.nn.Module) -> dict:
    return {
        "tensors": {n: t.clone() for n, t in module.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in module.named_parameters()},
        "modes": {n: m.training for n, m in module.named_modules()},
        "pre_hooks": {n: len(m._forward_pre_hooks) for n, m in module.named_modules()},
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scoring_leaves_weights_flags_modes_and_hooks_as_they_were(arch):
    model = _model(arch, lora=True)
    model.train()
    next(model.parameters()).requires_grad_(True)  # an unusual flag pattern survives too
    client, server = split_model(model, 2)
    seen_trainable = []

    def spy(module, args, output):  # base weights must never require grad during scoring
        seen_trainable.append(any(p.requires_grad for p in model.parameters()))

    for module in (model, client, server):
        before = _state(module)
        spy_handle = module.register_forward_hook(spy) if module is model else None
        if module is model:
            score_model(model, _batches())
        elif module is client:
            with ServerScorer(server) as main_server:
                score_client(client, _batches(), main_server)
        if spy_handle:
            spy_handle.remove()
        after = _state(module)
        assert after["flags"] == before["flags"]
        assert after["modes"] == before["modes"]
        assert after["pre_hooks"] == before["pre_hooks"]  # the server's swap-in stays
        for name, tensor in before["tensors"].items():
            assert torch.equal(after["tensors"][name], tensor), name
        for name, sub in module.named_modules():
            assert not sub._forward_hooks and not sub._backward_hooks, name
        assert all(p.grad is None for p in module.parameters())
    assert seen_trainable == [False, False]


def _one_live_branch(arch: str, live: int) -> torch.nn.Module:
    """Every residual branch off (zero output projection) but block ``live``'s attention."""
    model = tiny_model(arch, LAYERS)
    outputs = ("o_proj", "down_proj", "attn.c_proj", "mlp.c_proj")
    with torch.no_grad():
        for c in candidates(model):
            is_mlp_out = c.module.endswith(("down_proj", "mlp.c_proj"))
            if c.module.endswith(outputs) and (c.block != live or is_mlp_out):
                model.get_submodule(c.module).weight.zero_()
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_the_matrices_that_can_change_the_loss_score(arch):
    # A block whose branches write zeros is the identity: nothing in it can change the loss
    # (its inputs get no gradient; its zero output matrices have nothing to remove). With
    # the loss on the first position only, attention sees one token, its softmax is
    # constant, so query and key cannot change the loss either. Left: block 2's value and
    # output projections. Each branch is a product of two matrices, so no single matrix
    # can be made the only one that matters; the pair must rank first and the rest ~ 0.
    live = 2
    model = _one_live_branch(arch, live)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 320, (16, 2), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = torch.randint(0, 320, (16,), generator=g)
    scores = score_model(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                  "labels": labels}])
    names = {"llama": ("model.layers.2.self_attn.v_proj", "model.layers.2.self_attn.o_proj"),
             "gpt2": ("transformer.h.2.attn.c_attn:v", "transformer.h.2.attn.c_proj")}[arch]
    top = ranking(scores)
    assert set(top[:2]) == set(names)
    floor = min(scores[n] for n in names)
    assert floor > 0
    assert all(scores[n] < 1e-6 * floor for n in top[2:])
    blocks = global_importance_by_block(scores)
    assert max(range(LAYERS), key=blocks.__getitem__) == live
    assert sum(blocks) - blocks[live] < 1e-6 * blocks[live]
    if arch == "gpt2":  # the fused matrix carries its live v part
        fused = importance(scores, candidates(model))
        assert set(ranking(fused)[:2]) == {"transformer.h.2.attn.c_attn",
                                           "transformer.h.2.attn.c_proj"}


def test_bf16_autocast_scores_track_fp32():
    model = _model("llama")
    batches = _batches()
    exact = score_model(model, batches)
    mixed = score_model(model, batches, precision="bf16")
    assert list(mixed) == list(exact)
    for name, value in exact.items():
        assert math.isfinite(mixed[name])
        assert mixed[name] == pytest.approx(value, rel=0.02), name


def test_a_layer_running_twice_in_one_pass_is_an_error():
    model = tiny_model("llama", LAYERS)
    ids = _batches(1)[0]["input_ids"]
    with SensitivityProbe(model), pytest.raises(RuntimeError, match="ran twice in one forward"):
        model(input_ids=ids)
        model(input_ids=ids)
    with pytest.raises(RuntimeError, match="no gradient reached"):
        with SensitivityProbe(model) as probe:
            pass
        probe.sensitivities()


def test_normalisation_divides_by_the_relative_adapter_cost():
    llama = [c for c in candidates(tiny_model("llama", LAYERS)) if c.block < 2]
    # per rank: q, o 32+32; k, v 32+16; gate, up, down 32+64; mean 512/7
    costs = relative_costs(llama)
    assert costs["model.layers.0.self_attn.q_proj"] == pytest.approx(64 / (512 / 7))
    assert costs["model.layers.1.mlp.down_proj"] == pytest.approx(96 / (512 / 7))
    ones = dict.fromkeys((c.name for c in llama), 1.0)
    got = importance(ones, llama)
    assert got["model.layers.1.self_attn.k_proj"] == pytest.approx(512 / 7 / 48)
    assert importance(ones, llama, normalise=False) == ones
    # normalising two whole blocks apart gives what normalising them together gives
    apart = {**importance({n: 1.0 for n in ones if ".0." in n}, llama[:7]),
             **importance({n: 1.0 for n in ones if ".1." in n}, llama[7:])}
    assert apart == pytest.approx(got)

    gpt2 = [c for c in candidates(tiny_model("gpt2", LAYERS)) if c.block == 0]
    s = {"transformer.h.0.attn.c_attn:q": 1.0, "transformer.h.0.attn.c_attn:k": 2.0,
         "transformer.h.0.attn.c_attn:v": 6.0, "transformer.h.0.attn.c_proj": 2.0,
         "transformer.h.0.mlp.c_fc": 2.0, "transformer.h.0.mlp.c_proj": 2.0}
    # fused c_attn: equal thirds -> mean 3.0; module costs 128, 64, 160, 160 (mean 128)
    assert importance(s, gpt2, normalise=False) == pytest.approx(
        {"transformer.h.0.attn.c_attn": 3.0, "transformer.h.0.attn.c_proj": 2.0,
         "transformer.h.0.mlp.c_fc": 2.0, "transformer.h.0.mlp.c_proj": 2.0})
    assert importance(s, gpt2) == pytest.approx(
        {"transformer.h.0.attn.c_attn": 3.0, "transformer.h.0.attn.c_proj": 4.0,
         "transformer.h.0.mlp.c_fc": 1.6, "transformer.h.0.mlp.c_proj": 1.6})
    # parts kept apart: costs 64, 64, 64, 64, 160, 160 (mean 96)
    assert importance(s, gpt2, fuse=False)["transformer.h.0.attn.c_attn:v"] == \
        pytest.approx(6.0 * 96 / 64)
    with pytest.raises(KeyError, match="has no candidate"):
        importance({"model.layers.0.mlp.up_proj": 1.0}, gpt2)


def test_tracker_fixed_beta_is_an_exponential_moving_average():
    tracker = ImportanceTracker(beta=0.8)
    assert tracker.update({"a": 1.0, "b": 2.0}) == {"a": 1.0, "b": 2.0}
    assert tracker.update({"a": 3.0, "b": 0.0}) == pytest.approx({"a": 1.4, "b": 1.6})
    # a new matrix starts at its measurement; an unmeasured one keeps its history
    assert tracker.update({"a": 1.4, "c": 5.0}) == pytest.approx(
        {"a": 1.4, "b": 1.6, "c": 5.0})
    assert tracker.rounds == 3 and tracker.last_beta == 0.8


def test_tracker_adaptive_beta_follows_the_fluctuation():
    tracker = ImportanceTracker(adaptive=True, beta_low=0.5, beta_high=0.95, half_change=0.25)
    tracker.update({"a": 1.0, "b": 1.0})
    assert tracker.last_beta is None  # the first round is taken as is
    # rho = |2 - 1| / (1 + 1) = 0.5 -> beta = 0.5 + 0.45 * 0.25 / 0.75 = 0.65
    assert tracker.update({"a": 2.0, "b": 1.0}) == pytest.approx({"a": 1.35, "b": 1.0})
    assert tracker.last_change == pytest.approx(0.5)
    assert tracker.last_beta == pytest.approx(0.65)
    assert tracker.beta_for(0.0) == pytest.approx(0.95)
    assert tracker.beta_for(0.25) == pytest.approx(0.725)  # halfway at half_change
    assert tracker.beta_for(math.inf) == pytest.approx(0.5)
    betas = [tracker.beta_for(rho) for rho in (0.0, 0.1, 0.5, 2.0, 10.0)]
    assert betas == sorted(betas, reverse=True)


@pytest.mark.parametrize("kwargs", [{"beta": 1.0}, {"beta_low": -0.1},
                                    {"beta_low": 0.9, "beta_high": 0.5},
                                    {"half_change": 0.0}])
def test_tracker_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="ImportanceTracker"):
        ImportanceTracker(**kwargs)


def test_ranking_and_block_totals():
    scores = {"model.layers.1.mlp.up_proj": 2.0, "model.layers.0.self_attn.q_proj": 2.0,
              "model.layers.0.mlp.up_proj": 5.0, "transformer.h.3.attn.c_attn:q": 1.0}
    assert ranking(scores) == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj",
                               "model.layers.1.mlp.up_proj", "transformer.h.3.attn.c_attn:q"]
    assert global_importance_by_block(scores) == [7.0, 2.0, 0.0, 1.0]
    assert global_importance_by_block(scores, num_blocks=6) == [7.0, 2.0, 0.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="num_blocks=2"):
        global_importance_by_block(scores, num_blocks=2)
    with pytest.raises(ValueError, match="names no block"):
        global_importance_by_block({"lm_head": 1.0})


def _energy_reference(model: torch.nn.Module, batches: list[dict], ranks,
                      label_smoothing: float = 0.0) -> dict[str, float]:
    """E(r) of each module's mean gradient over the batches, straight from autograd."""
    modules = list(dict.fromkeys(c.module for c in candidates(model)))
    weights = []
    for m in modules:
        layer = model.get_submodule(m)
        weights.append(getattr(layer, "base_layer", layer).weight)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for w in weights:
        w.requires_grad_(True)
    total = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    model.eval()
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = causal_lm_loss(logits, b["labels"], label_smoothing)[0]
        for acc, g in zip(total, torch.autograd.grad(loss, weights), strict=True):
            acc += g.float()
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    out = {}
    for m, g in zip(modules, total, strict=True):
        sigma = torch.linalg.svdvals(g / len(batches)).double()
        for r in ranks:
            out[f"{m}@{r}"] = float((sigma[:r] ** 2).sum())
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_split_energies_are_the_spectrum_of_the_unsplit_accumulated_gradient(arch):
    model = _model(arch, lora=True)
    batches = _batches()
    want = _energy_reference(model, batches, GAIN_RANKS, label_smoothing=0.1)
    for cut in (0, 2, LAYERS):
        client, server = split_model(model, cut)
        with ServerScorer(server, label_smoothing=0.1, spectrum=True) as main_server:
            got = segment_importance(client, batches, main_server)
        got.update(main_server.energies())
        assert set(got) == set(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-12), key
    # energies grow with rank and stop growing at the gradient's rank (here min(d_in, d_out))
    q = "model.layers.1.self_attn.k_proj" if arch == "llama" else "transformer.h.1.attn.c_attn"
    curve = [want[f"{q}@{r}"] for r in GAIN_RANKS]
    assert curve == sorted(curve) and curve[-1] == curve[-2] > curve[0] > 0


def test_scoring_uses_the_runs_label_smoothing():
    model = _model("llama")
    batches = _batches()
    client, server = split_model(model, 2)
    plain, smooth = {}, {}
    for smoothing, out in ((0.0, plain), (0.3, smooth)):
        with ServerScorer(server, label_smoothing=smoothing, spectrum=True) as main_server:
            out.update(segment_importance(client, batches, main_server))
        out.update(main_server.energies())
    want = _energy_reference(model, batches, GAIN_RANKS, label_smoothing=0.3)
    assert smooth == pytest.approx(want, rel=1e-4)
    assert any(abs(smooth[k] - plain[k]) > 1e-3 * plain[k] for k in plain)


def test_rank_energies_gains_and_module_energy_by_hand():
    assert rank_energies(torch.tensor([3.0, 2.0, 1.0]), (0, 1, 2, 5)) == {
        0: 0.0, 1: 9.0, 2: 13.0, 5: 14.0}
    flat = {"m@1": 4.0, "m@2": 6.0, "m@4": 7.0, "n@4": 1.0}
    assert rank_gains(flat, (0, 2, 3, 8)) == {"m": {0: 0.0, 2: 6.0, 3: 6.5, 8: 7.0},
                                              "n": {0: 0.0, 2: 0.5, 3: 0.75, 8: 1.0}}
    assert module_energy(flat) == {"m": 7.0, "n": 1.0}
    with pytest.raises(ValueError, match="not a gain entry"):
        rank_gains({"model.layers.0.q_proj": 1.0}, (0, 2))
