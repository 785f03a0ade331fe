"""HSplitLoRA, its ablations and the heterogeneous baselines, end to end on a tiny Llama."""

from __future__ import annotations

import math
import re

import peft
import pytest
import torch

from hsplitlora.config import RunConfig
from hsplitlora.train.run import train
from tests.conftest import E2E, tiny_model

SCENARIO = {"kind": "heterogeneous", "memory_range": ["1.2 MiB", "3 MiB"], "seed": 1}


def tight_scenario(tmp_path, tok, mode: str = "flora") -> dict:
    """Budgets just above the cost model's client memory at cut 2 with q/v adapters of rank
    2, 4 and 8, for the workload this run of ``mode`` will have (its planner's: a merging
    aggregator's merge state included)."""
    from hsplitlora.hetero.costmodel import ModelDims, client_memory
    from hsplitlora.hetero.planner import Planner
    from hsplitlora.hetero.profiles import PRESETS
    from hsplitlora.train.run import mean_length, prepare

    cfg = _cfg(tmp_path, mode)
    p = prepare(cfg, tiny_model("llama"), tok)
    dims = ModelDims.from_config(p.model.config)
    work = Planner(cfg, p.model, [PRESETS["laptop"]] * 3, PRESETS["server"],
                   mean_length(p.shards)).work
    qv = [f"model.layers.{b}.self_attn.{m}" for b in range(2) for m in ("q_proj", "v_proj")]
    budgets = [client_memory(dims, 2, dict.fromkeys(qv, r), work).total + 64 for r in (2, 4, 8)]
    return {"kind": "explicit", "clients": [
        {"name": f"dev{i}", "memory_bytes": b, "flops": 1e12, "uplink_bps": 1e6,
         "downlink_bps": 1e6} for i, b in enumerate(budgets)]}


def _cfg(tmp_path, mode: str, **hetero) -> RunConfig:
    return RunConfig.model_validate({
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": None,
                 "max_train_examples": 60, "max_length": 160},
        "train": {"mode": mode, "num_clients": 3, "cut": 2, "steps": 2, "batch_size": 2,
                  "agg_interval": 1, "lr": 0.01, "precision": "fp32"},
        "hetero": {"scenario": SCENARIO, "rank_set": [0, 2, 4, 8], "server_rank": 4,
                   "probe_batches": 1, **hetero},
        "eval": {"max_examples": 0},
        "output": {"dir": str(tmp_path), "name": mode, "sample_prompt": None},
    })


def _run(tmp_path, tok, mode, **hetero):
    return train(_cfg(tmp_path, mode, **hetero), model=tiny_model("llama"), tokenizer=tok,
                 show_progress=False)


@pytest.mark.parametrize("aggregator", ["noisefree", "zeropad"])  # zeropad: NAA off
def test_hsplitlora_plans_per_client_and_exports_a_peft_adapter(tmp_path, tiny_tokenizer,
                                                                aggregator):
    result = _run(tmp_path, tiny_tokenizer, "hsplitlora", aggregator=aggregator)
    plan = next(r for r in result.records if r.get("event") == "plan")["plans"]
    assert len(plan) == 3 and all(1 <= p["cut"] <= 3 for p in plan)
    assert any(r.get("event") == "aggregate" and r["method"] == aggregator
               for r in result.records)
    # the adapter folder, loaded by PEFT on the untouched base, is the run's final model
    # (that this equals the split model that trained: test_hetero.py's export test)
    base = tiny_model("llama").eval()
    ids = torch.randint(0, 300, (2, 10))
    untuned = base(input_ids=ids).logits
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "hsplitlora" / "adapter"))
    got = loaded.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, result.model.eval()(input_ids=ids).logits, atol=1e-5,
                               rtol=0)
    assert (got - untuned).abs().max() > 1e-4
    # the simulated clock at least pays for every byte the run recorded, on its links
    assert result.summary["simulated_s"] >= _transfer_seconds(result) > 0


def _transfer_seconds(result) -> float:
    """Seconds the recorded bytes need on the scenario's links: per round the slowest
    client's activations and gradients, per aggregation the slowest link's share."""
    from hsplitlora.hetero.profiles import ScenarioConfig

    clients = ScenarioConfig.model_validate(SCENARIO).profiles(3, 1)
    server = ScenarioConfig().server_profile()
    per_round: dict[int, float] = {}
    total = 0.0
    for r in result.records:
        if "event" not in r:
            dev = clients[r["client"]]
            t = (r["bytes_up"] / min(dev.uplink_bps, server.downlink_bps)
                 + r["bytes_down"] / min(server.uplink_bps, dev.downlink_bps))
            per_round[r["round"]] = max(per_round.get(r["round"], 0.0), t)
        elif r["event"] == "aggregate":
            slow = min(clients, key=lambda p: min(p.uplink_bps, p.downlink_bps))
            total += (r["bytes_up"] / 3 / slow.uplink_bps + r["bytes_down"] / 3
                      / slow.downlink_bps)
    return total + sum(per_round.values())


def _update_norms(result) -> dict[str, float]:
    """||B A|| of every module of the exported adapter (> 0: training moved it)."""
    out = {}
    for key, a in result.adapter.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module] = float((result.adapter[f"{module}.lora_B.weight"] @ a).norm())
    return out


@pytest.mark.parametrize("hetero", [{"importance": False}, {"adaptive": False},
                                    # a non-merging aggregator takes a copy per client
                                    {"aggregator": "zeropad", "server_side": "per_participant"}])
def test_each_component_can_be_switched_off(tmp_path, tiny_tokenizer, hetero, monkeypatch):
    import hsplitlora.hetero.planner as planner_module

    probes = []
    real_probe = planner_module.probe_importance
    monkeypatch.setattr(planner_module, "probe_importance",
                        lambda *a, **k: probes.append(1) or real_probe(*a, **k))
    result = _run(tmp_path, tiny_tokenizer, "hsplitlora", **hetero)
    plan = next(r for r in result.records if r.get("event") == "plan")["plans"]
    if hetero.get("importance") is False:  # IWI off: nothing probed, the uninformed plan
        assert probes == []
        from hsplitlora.hetero.planner import Planner
        from hsplitlora.train.run import mean_length, prepare

        cfg = _cfg(tmp_path, "hsplitlora", **hetero)
        p = prepare(cfg, tiny_model("llama"), tiny_tokenizer)
        params = sum(x.numel() for n, x in p.model.named_parameters() if ".lora_" not in n)
        planner = Planner(cfg, p.model, cfg.hetero.scenario.profiles(3, params),
                          cfg.hetero.scenario.server_profile(), mean_length(p.shards))
        assert plan == [{"cut": pl.cut, "ranks": dict(pl.ranks)} for pl in planner.plans(None)]
    else:
        assert probes  # IWI on: importance measured before planning
    if hetero.get("adaptive") is False:  # ARMSC off: train.cut, lora.r on as many modules
        n_default = 2 * 4  # q and v in each of the tiny Llama's 4 blocks
        assert all(p["cut"] == 2 and set(p["ranks"].values()) == {4}
                   and len(p["ranks"]) == n_default for p in plan)
        assert len({frozenset(p["ranks"]) for p in plan}) == 1  # one placement for all
    method = next(r for r in result.records if r.get("event") == "aggregate")["method"]
    assert method == hetero.get("aggregator", "noisefree")
    norms = _update_norms(result)  # training moved the model, and only by finite amounts
    assert norms and all(math.isfinite(v) for v in norms.values()) and max(norms.values()) > 0


@pytest.mark.parametrize("mode,method", [("hetlora", "zeropad"), ("flexlora", "svd"),
                                         ("flora", "stack")])
def test_baselines_give_each_client_the_largest_rank_its_memory_fits(tmp_path, tiny_tokenizer,
                                                                     mode, method):
    result = _run(tmp_path, tiny_tokenizer, mode,
                  scenario=tight_scenario(tmp_path, tiny_tokenizer, mode))
    plan = next(r for r in result.records if r.get("event") == "plan")["plans"]
    ranks = [set(p["ranks"].values()) for p in plan]
    assert all(p["cut"] == 2 for p in plan)
    assert [r.pop() for r in ranks] == [2, 4, 8]
    assert next(r for r in result.records if r.get("event") == "aggregate")["method"] == method


def test_splitlora_on_heterogeneous_devices_uses_the_weakest_rank(tmp_path, tiny_tokenizer):
    result = _run(tmp_path, tiny_tokenizer, "splitlora",
                  scenario=tight_scenario(tmp_path, tiny_tokenizer, "splitlora"))
    ranks = {v.shape[0] for k, v in result.adapter.items() if k.endswith("lora_A.weight")}
    assert ranks == {2}


def test_a_client_that_cannot_fit_gets_a_clear_error(tmp_path, tiny_tokenizer):
    from hsplitlora.hetero.armsc import PlanError

    tiny = {"kind": "explicit", "clients": [
        {"name": "watch", "memory_bytes": "10 KiB", "flops": 1e9, "uplink_bps": 1e5,
         "downlink_bps": 1e5}] * 3}
    with pytest.raises(PlanError, match=r"watch.*KiB"):
        _run(tmp_path, tiny_tokenizer, "hetlora", scenario=tiny)


def test_plan_cli_prints_the_table_without_training(tmp_path, tiny_llama_dir):
    from typer.testing import CliRunner

    from hsplitlora.cli import app

    cfg = tmp_path / "plan.yaml"
    cfg.write_text(f"""
model: {{name: {tiny_llama_dir}}}
data: {{train_files: [{E2E / 'original' / 'devset.csv'}], max_train_examples: 60,
        max_length: 160}}
train: {{mode: hsplitlora, num_clients: 3, batch_size: 2, precision: fp32}}
hetero: {{scenario: {{kind: heterogeneous, memory_range: ["1.2 MiB", "3 MiB"], seed: 1}},
          probe_batches: 1}}
output: {{dir: {tmp_path / 'runs'}}}
""")
    result = CliRunner().invoke(app, ["plan", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "per-client plan" in result.output and "memory / budget" in result.output
    assert len(re.findall(r"│ laptop-\d", result.output)) == 3  # one table row per client
    assert not (tmp_path / "runs").exists()  # nothing trained, no run folder
    tiny = CliRunner().invoke(app, ["plan", "--config", str(cfg), "--set",
                                    'hetero.scenario.memory_range=["1 KiB", "2 KiB"]'])
    assert tiny.exit_code == 2 and "budget" in tiny.output


def test_plan_cli_plans_a_model_from_its_config_alone(tmp_path):
    from typer.testing import CliRunner

    from hsplitlora.cli import app

    shapes = tmp_path / "shapes"
    tiny_model("llama").config.save_pretrained(shapes)  # config.json only: no weights
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(f"""
model: {{name: {shapes}}}
data: {{max_length: 64}}
train: {{mode: hsplitlora, num_clients: 7, batch_size: 2, precision: bf16}}
hetero: {{scenario: {{kind: heterogeneous, memory_range: ["1.2 MiB", "3 MiB"], seed: 1}}}}
output: {{dir: {tmp_path / 'runs'}}}
""")
    result = CliRunner().invoke(app, ["plan", "--meta", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert len(re.findall(r"│ laptop-\d", result.output)) == 7
    assert "main server" in result.output and "compute per round" in result.output
    assert not (tmp_path / "runs").exists()

    from hsplitlora.config import load_config
    from hsplitlora.plan import plan_run

    plan, dims = plan_run(load_config(cfg), meta=True)
    # the base is stored in bf16; noise-free merges keep, per candidate weight element, the
    # bf16 weight as loaded and the fp32 sum of merged updates: budgets cost all of it
    candidates = sum(m.d_in * m.d_out for m in dims.candidates)
    for c in plan.clients:
        assert c.memory.frozen_weights == (
            2 * (dims.embedding_params + dims.norm_params + c.cut * dims.block_params)
            + (2 + 4) * c.cut * candidates)
        assert c.memory.total <= c.budget_bytes
    plan, dims = plan_run(load_config(cfg, ["hetero.aggregator=svd",
                                            "hetero.server_side=per_participant"]), meta=True)
    assert all(c.memory.frozen_weights
               == 2 * (dims.embedding_params + dims.norm_params + c.cut * dims.block_params)
               for c in plan.clients)  # nothing merged, nothing extra


def test_a_uniform_plan_reports_the_round_the_engine_runs(tmp_path):
    """SplitLoRA's one cut and rank, described by the cost model: the round is the
    synchronous one (I steps of the slowest client or of the server serving everyone,
    then the slowest aggregation), not NaN, and a utility it never computed reads '-'."""
    from hsplitlora.config import load_config
    from hsplitlora.hetero.armsc import format_plan_table
    from hsplitlora.plan import plan_run

    shapes = tmp_path / "shapes"
    tiny_model("llama").config.save_pretrained(shapes)
    cfg = tmp_path / "plan.yaml"
    cfg.write_text(f"""
model: {{name: {shapes}}}
data: {{max_length: 64}}
train: {{mode: splitlora, num_clients: 3, cut: 2, batch_size: 2, agg_interval: 5}}
hetero: {{scenario: {{kind: heterogeneous, memory_range: ["1.2 MiB", "3 MiB"], seed: 1}}}}
""")
    plan, dims = plan_run(load_config(cfg), meta=True)
    assert {c.cut for c in plan.clients} == {2}
    for c in plan.clients:
        assert c.aggregation_seconds > 0
        assert c.round_seconds == pytest.approx(5 * c.step_seconds + c.aggregation_seconds)
    steps = 5 * max(c.step_seconds for c in plan.clients)
    served = 5 * sum(c.server_seconds for c in plan.clients)
    assert plan.round_seconds == pytest.approx(
        max(steps, served) + max(c.aggregation_seconds for c in plan.clients), rel=1e-12)
    table = format_plan_table(plan, dims)
    assert f"Round {plan.round_seconds:.4g} s" in table.caption
    assert list(table.columns[-1].cells) == ["-"] * 3


def test_federated_baseline_trains_the_whole_model_on_each_client(tmp_path, tiny_tokenizer):
    from hsplitlora.hetero.armsc import PlanError

    roomy = {**SCENARIO, "memory_range": ["3 MiB", "6 MiB"]}
    result = _run(tmp_path, tiny_tokenizer, "flora", federated=True, scenario=roomy)
    plan = next(r for r in result.records if r.get("event") == "plan")["plans"]
    assert all(p["cut"] == 4 for p in plan)  # every block on the client
    steps = [r for r in result.records if "event" not in r]
    assert steps and all(r["bytes_up"] == 0 and r["bytes_down"] == 0 for r in steps)
    # every client-held adapter of every block trained: q and v of all 4 blocks moved
    norms = _update_norms(result)
    assert set(norms) == {f"model.layers.{b}.self_attn.{m}_proj" for b in range(4)
                          for m in "qv"}
    assert all(math.isfinite(v) and v > 0 for v in norms.values())
    with pytest.raises(ValueError, match="hetero.federated applies to"):
        _cfg(tmp_path, "hsplitlora", federated=True)
    with pytest.raises(PlanError, match="cannot hold cut 4"):  # whole model over budget
        _run(tmp_path, tiny_tokenizer, "flora", federated=True)
