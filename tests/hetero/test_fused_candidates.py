"""Parts of a fused matrix as separate candidates: importance, cost model and planner."""

import torch

from hsplitlora.hetero.armsc import PlannerSettings, plan_client, prior_gains
from hsplitlora.hetero.costmodel import ModelDims, Workload, lora_memory_per_rank
from hsplitlora.hetero.importance import candidates, importance, score_model
from hsplitlora.hetero.profiles import PRESETS
from hsplitlora.models.lora import LoraSettings, attach_lora, lora_state
from tests.conftest import tiny_model

QV = ("attn.c_attn:q", "attn.c_attn:v")


def _batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 320, (2, 10), generator=g)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def test_parts_are_candidates_from_scores_to_a_plan_that_attaches():
    model = tiny_model("gpt2", layers=2)
    scores = score_model(model, _batches())
    parts = importance(scores, candidates(model), fuse=False)
    assert {"transformer.h.0.attn.c_attn:q", "transformer.h.1.attn.c_attn:v"} <= set(parts)
    dims = ModelDims.from_config(model.config, targets=QV)
    assert [(m.path, m.kind, m.d_out, m.d_in) for m in dims.candidates] == [
        ("attn.c_attn:q", "q", 32, 32), ("attn.c_attn:v", "v", 32, 32)]
    work = Workload.for_precision("fp32", 2, 10)
    # a part costs a third of the fused matrix's adapter per rank (d_out 32 of 96)
    whole = ModelDims.from_config(model.config, targets=("attn.c_attn",)).candidates[0]
    assert lora_memory_per_rank(dims.candidates[0], work) < lora_memory_per_rank(whole, work)
    settings = PlannerSettings(min_cut=2, max_cut=2, server_rank=0)
    gains = prior_gains(dims, settings.gain_ranks, parts)  # the k part is no candidate
    assert set(gains) == {n for n in parts if n.endswith((":q", ":v"))}
    plan = plan_client(0, PRESETS["server"], PRESETS["server"], dims, gains, work, settings)
    assert plan.ranks and all(":" in name for name in plan.ranks)
    attach_lora(model, LoraSettings(r=4, targets=QV, ranks=plan.ranks))
    state = lora_state(model)
    for name, rank in plan.ranks.items():
        assert state[f"{name}.lora_A.weight"].shape == (rank, 32)
        assert state[f"{name}.lora_B.weight"].shape == (32, rank)
