"""train.compile: compiled blocks train the same numbers as eager ones, and only in training."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters

from hsplitlora.config import RunConfig
from hsplitlora.models.split import split_model
from hsplitlora.roles.learner import Learner
from hsplitlora.runtime.compile import CompileError, check_compiler, compiled_blocks
from hsplitlora.runtime.optim import OptimSettings
from hsplitlora.train.run import train
from tests.conftest import E2E, tiny_model
from tests.train.test_hetero_modes import _cfg as hetero_cfg


def _cfg(mode: str, precision: str, compile: bool) -> RunConfig:
    return RunConfig.model_validate({
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        # E2E examples of varying length: batches of several shapes, so the compiled
        # blocks also go through inductor's shape-generic recompile.
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 40, "max_length": 96},
        "train": dict(mode=mode, num_clients=2, cut=1, steps=4, batch_size=2, agg_interval=2,
                      lr=5e-3, precision=precision, seed=5, compile=compile),
        "eval": {"max_examples": 0},
        "output": {"sample_prompt": None},
    })


def _train(tok, arch: str, mode: str, precision: str, compile: bool):
    torch._dynamo.reset()  # no compiled code from earlier tests: this run compiles its own
    graphs = counters["stats"]["unique_graphs"]
    result = train(_cfg(mode, precision, compile), model=tiny_model(arch), tokenizer=tok,
                   write=False, show_progress=False)
    compiled = counters["stats"]["unique_graphs"] - graphs
    assert compiled > 0 if compile else compiled == 0  # the blocks did (not) run compiled
    return result


def _losses(result) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in result.records if "event" not in r])


@pytest.mark.parametrize(("arch", "mode"), [("llama", "centralized"), ("llama", "splitlora"),
                                            ("gpt2", "splitfed")])
def test_compiled_fp32_training_matches_eager(tiny_tokenizer, arch, mode):
    eager = _train(tiny_tokenizer, arch, mode, "fp32", compile=False)
    compiled = _train(tiny_tokenizer, arch, mode, "fp32", compile=True)
    assert len(_losses(compiled)) == len(_losses(eager)) > 0
    torch.testing.assert_close(_losses(compiled), _losses(eager), atol=1e-5, rtol=1e-5)
    assert set(compiled.adapter) == set(eager.adapter)
    for name, value in eager.adapter.items():
        torch.testing.assert_close(compiled.adapter[name], value, atol=1e-5, rtol=1e-4,
                                   msg=name)
    assert any(v.abs().sum() > 0 for k, v in compiled.adapter.items() if "lora_B" in k)


def test_compiled_heterogeneous_training_matches_eager(tmp_path, tiny_tokenizer):
    """HSplitLoRA: per-client cuts and ranks, blocks with and without adapters, adapters
    restarted at every merging aggregation; all through the one compiled block function."""
    results = []
    for compile in (False, True):
        cfg = hetero_cfg(tmp_path / str(compile), "hsplitlora")
        cfg.train.compile = compile
        torch._dynamo.reset()
        graphs = counters["stats"]["unique_graphs"]
        results.append(train(cfg, model=tiny_model("llama"), tokenizer=tiny_tokenizer,
                             show_progress=False))
        assert (counters["stats"]["unique_graphs"] > graphs) == compile
    eager, compiled = results
    torch.testing.assert_close(_losses(compiled), _losses(eager), atol=1e-5, rtol=1e-5)
    # The exported adapter factors an aggregate of different ranks (noise-free
    # aggregation): round-off may turn the factors within their span, so compare the
    # update B @ A each module applies, which is what the model computes with.
    assert set(compiled.adapter) == set(eager.adapter)
    for name, a in eager.adapter.items():
        if ".lora_A." in name:
            b_name = name.replace(".lora_A.", ".lora_B.")
            torch.testing.assert_close(compiled.adapter[b_name] @ compiled.adapter[name],
                                       eager.adapter[b_name] @ a, atol=1e-6, rtol=1e-4,
                                       msg=name)


def test_compiled_bf16_training_stays_close_to_eager(tiny_tokenizer):
    """bf16: inductor may keep a fused chain in fp32 where eager rounds every op, so the
    losses agree to bf16's precision, not bit for bit."""
    eager = _losses(_train(tiny_tokenizer, "llama", "centralized", "bf16", compile=False))
    compiled = _losses(_train(tiny_tokenizer, "llama", "centralized", "bf16", compile=True))
    torch.testing.assert_close(compiled, eager, atol=0, rtol=2e-2)


def test_blocks_run_compiled_only_inside_the_training_step():
    torch._dynamo.reset()  # so the step below traces afresh and the counter moves
    model = tiny_model("llama")
    blocks = model.model.layers
    batch = {"input_ids": torch.randint(0, 320, (2, 12)),
             "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    learner = Learner(model, iter([batch]), OptimSettings(lr=1e-3, total_steps=1),
                      precision="fp32", compile=True)
    before = counters["stats"]["calls_captured"]
    learner.step()
    assert counters["stats"]["calls_captured"] > before  # the step went through dynamo
    assert all("forward" not in block.__dict__ for block in blocks)  # plain modules again
    seen = counters["stats"]["calls_captured"]
    with torch.no_grad():
        model(**batch)  # evaluation: eager, no new frames for dynamo
    assert counters["stats"]["calls_captured"] == seen


def test_server_segment_hook_still_feeds_received_activations_when_compiled():
    """The server segment swaps the client's activations into its first block with a
    forward pre-hook; a compiled block must still see them."""
    client, server = split_model(tiny_model("llama").eval(), 2)
    ids = torch.randint(0, 320, (2, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        acts = client(ids, mask)
        eager = server.hidden(acts, mask)
    with compiled_blocks(server.blocks):
        compiled = server.hidden(acts.requires_grad_(True), mask)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    check_compiler(torch.device("cpu"))  # this machine has both
    check_compiler(torch.device("cuda"))
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++-compiler-hsplitlora",))
    with pytest.raises(CompileError, match="C\\+\\+ compiler.*train.compile: false"):
        check_compiler(torch.device("cpu"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, no clang
    with pytest.raises(CompileError, match="C compiler.*train.compile: false"):
        check_compiler(torch.device("cuda"))
