"""Training-mode invariants on a tiny Llama: equivalences, aggregation, frozen base."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.config import RunConfig
from hsplitlora.models.lora import lora_state
from hsplitlora.train.run import train
from tests.conftest import E2E, tiny_model


def _cfg(**train) -> RunConfig:
    base = dict(mode="splitlora", num_clients=1, cut=2, steps=4, batch_size=2, agg_interval=1,
                lr=5e-3, precision="fp32", warmup_steps=1, seed=3)
    base.update(train)
    return RunConfig.model_validate({
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 60, "max_length": 160},
        "train": base,
        "eval": {"max_examples": 0},
        "output": {"sample_prompt": None},
    })


def _run(tok, **train):
    return train_once(tok, _cfg(**train))


def train_once(tok, cfg):
    return train(cfg, model=tiny_model("llama"), tokenizer=tok, write=False, show_progress=False)


def _losses(result):
    return [r["loss"] for r in result.records if "event" not in r]


@pytest.fixture(scope="module")
def central(tiny_tokenizer):
    return _run(tiny_tokenizer, mode="centralized")


@pytest.mark.parametrize("tail", [0, 1])
def test_one_client_splitlora_matches_centralized_step_for_step(tiny_tokenizer, central, tail):
    split = _run(tiny_tokenizer, mode="splitlora", tail=tail)  # tail 1: U-shaped, block 3
    assert len(_losses(split)) == len(_losses(central)) == 4
    torch.testing.assert_close(torch.tensor(_losses(split)), torch.tensor(_losses(central)),
                               atol=1e-6, rtol=0)
    assert set(split.adapter) == set(central.adapter)
    for k, v in central.adapter.items():
        torch.testing.assert_close(split.adapter[k], v, atol=1e-6, rtol=0, msg=k)
    # and training did move the adapters
    assert any(v.abs().sum() > 0 for k, v in central.adapter.items() if "lora_B" in k)
    # the client's own adapters: blocks [0, 2), and the tail's block 3
    own = {0, 1, 3} if tail else {0, 1}
    assert split.summary["client_trainable_params"] == sum(
        v.numel() for k, v in split.adapter.items() if int(k.split(".")[2]) in own)


@pytest.mark.parametrize(("mode", "tail"), [("centralized", 0), ("split", 0), ("splitfed", 0),
                                           ("splitlora", 0), ("split", 1)])
def test_base_weights_stay_bit_identical_only_lora_changes(tiny_tokenizer, mode, tail):
    reference = tiny_model("llama").state_dict()
    result = _run(tiny_tokenizer, mode=mode, num_clients=2, steps=3, agg_interval=2, tail=tail)
    lora_seen = 0
    for name, p in result.model.state_dict().items():
        if ".lora_" in name:
            lora_seen += 1
            continue
        base_name = name.replace(".base_layer", "")
        assert torch.equal(p, reference[base_name]), name
    assert lora_seen > 0
    assert any(v.abs().sum() > 0 for k, v in result.adapter.items() if "lora_B" in k)


def test_splitlora_aggregation_is_sample_weighted_fedavg(tiny_tokenizer):
    """With I=2 and 3 steps, the final aggregate is the weighted mean of the clients' states."""
    cfg = _cfg(mode="splitlora", num_clients=3, steps=3, agg_interval=2)
    from hsplitlora.train import engine

    captured = {}
    original = engine.fedavg_clients

    def spy(clients, among, fed, rec, round):
        assert among == clients  # every client trained
        captured["states"] = [c.adapter_state() for c in clients]
        captured["n"] = [c.num_samples for c in clients]
        out = original(clients, among, fed, rec, round)
        captured["after"] = [c.adapter_state() for c in clients]
        return out

    engine.fedavg_clients = spy
    try:
        result = train_once(tiny_tokenizer, cfg)
    finally:
        engine.fedavg_clients = original
    n = torch.tensor(captured["n"], dtype=torch.float64)
    w = n / n.sum()
    for key in captured["states"][0]:
        expected = sum(wi * s[key].double() for wi, s in zip(w, captured["states"], strict=True))
        for after in captured["after"]:
            torch.testing.assert_close(after[key].double(), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(result.adapter[key].double(), expected, atol=1e-6, rtol=0)
    aggs = [r for r in result.records if r.get("event") == "aggregate"]
    assert [a["round"] for a in aggs] == [1, 2]


def test_split_mode_relays_one_adapter_between_clients(tiny_tokenizer):
    result = _run(tiny_tokenizer, mode="split", num_clients=2, steps=2, agg_interval=1)
    order = [r["client"] for r in result.records if "event" not in r]
    assert order == [0, 1, 0, 1]
    handoffs = [r for r in result.records if r.get("event") == "handoff"]
    assert [(h["source"], h["target"]) for h in handoffs] == [(0, 1), (1, 0), (0, 1), (1, 0)]


def test_splitfed_averages_server_copies(tiny_tokenizer):
    result = _run(tiny_tokenizer, mode="splitfed", num_clients=2, steps=2, agg_interval=2)
    sides = [r["side"] for r in result.records if r.get("event") == "aggregate"]
    assert sides == ["client", "server"]
    server_keys = [k for k in result.adapter if int(k.split(".")[2]) >= 2]
    assert server_keys


def test_same_seed_same_adapters_different_seed_differs(tiny_tokenizer):
    a = _run(tiny_tokenizer, num_clients=2, steps=2)
    b = _run(tiny_tokenizer, num_clients=2, steps=2)
    c = _run(tiny_tokenizer, num_clients=2, steps=2, seed=4)
    assert all(torch.equal(a.adapter[k], b.adapter[k]) for k in a.adapter)
    assert not all(torch.equal(a.adapter[k], c.adapter[k]) for k in a.adapter)


def test_lora_state_of_trained_model_is_the_returned_adapter(tiny_tokenizer):
    result = _run(tiny_tokenizer, num_clients=2, steps=2)
    state = lora_state(result.model)
    assert all(torch.equal(state[k], result.adapter[k]) for k in state)


@pytest.mark.parametrize("mode", ["centralized", "splitlora"])
def test_evaluation_at_intervals_logs_held_out_perplexity(tiny_tokenizer, mode):
    cfg = _cfg(mode=mode, num_clients=2, steps=4, agg_interval=1)
    cfg = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"eval_file": E2E / "original" / "testset_w_refs.csv"}),
        "eval": cfg.eval.model_copy(update={"max_examples": 6, "every": 2}),
    })
    result = train_once(tiny_tokenizer, cfg)
    evals = [r for r in result.records if r.get("event") == "eval"]
    assert len(evals) == 2  # one mid-run (after 2 aggregations) and the final one
    mid, final = evals
    assert mid["round"] < final["round"]
    assert final["loss"] == pytest.approx(result.summary["eval_loss"])
    assert final["ppl"] == pytest.approx(torch.exp(torch.tensor(final["loss"])).item(), rel=1e-5)
    assert final["loss"] < mid["loss"]  # training keeps lowering the held-out loss


def test_bucketed_widths_train_as_the_exact_ones(tiny_tokenizer):
    """data.pad_to_multiple_of only adds masked, unlabelled positions after each example:
    under causal attention no real token sees them, so every step's loss and the adapters
    agree with exact-width batches to rounding (the kernels' blocking differs), and the
    batches really were wider."""
    from hsplitlora.train.parties import shard_stream
    from hsplitlora.train.run import prepare

    exact = _run(tiny_tokenizer, mode="splitlora", num_clients=2)
    cfg = _cfg(mode="splitlora", num_clients=2).model_copy(deep=True)
    cfg.data.pad_to_multiple_of = 16
    bucketed = train_once(tiny_tokenizer, cfg)
    torch.testing.assert_close(torch.tensor(_losses(bucketed)), torch.tensor(_losses(exact)),
                               atol=1e-5, rtol=0)
    for k, v in exact.adapter.items():
        torch.testing.assert_close(bucketed.adapter[k], v, atol=1e-5, rtol=0, msg=k)
    for c, multiple in ((cfg, 16), (_cfg(mode="splitlora", num_clients=2), 1)):
        stream = shard_stream(prepare(c, model=tiny_model("llama"), tokenizer=tiny_tokenizer), 0)
        widths = [next(stream)["input_ids"].shape[1] for _ in range(8)]
        assert all(w % 16 == 0 for w in widths) == (multiple == 16), widths
