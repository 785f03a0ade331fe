"""The experiment runner: grid expansion, skipping finished runs, resuming, the summary."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from hsplitlora import experiment as experiment_module
from hsplitlora.cli import app
from hsplitlora.config import ConfigError
from hsplitlora.eval import evaluate as evaluate_module
from hsplitlora.eval.metrics import Scores
from hsplitlora.experiment import load_experiment, run_experiment, run_name
from hsplitlora.train import run as run_module
from tests.conftest import E2E

SPLIT = "mode=splitlora_r=2_cut=1_seed=0"
CENTRAL = "mode=centralized_r=2_seed=0"


def _experiment(tmp_path, model_dir, grid=None, evaluate=None, lr=0.01):
    spec = {
        "base": {
            "model": {"name": str(model_dir)},
            "lora": {"r": 8, "alpha": 4, "dropout": 0.0},
            "data": {"train_files": [str(E2E / "original" / "devset.csv")],
                     "eval_file": str(E2E / "original" / "testset_w_refs.csv"),
                     "max_train_examples": 12, "max_length": 160},
            "train": {"num_clients": 2, "steps": 2, "batch_size": 2, "agg_interval": 1,
                      "lr": lr, "precision": "fp32"},
            "eval": {"max_examples": 4},
            "output": {"sample_prompt": None},
        },
        "grid": grid or {"mode": ["splitlora", "centralized"], "rank": [2], "cut": [1],
                         "seed": [0]},
        "output": str(tmp_path / "grid"),
    }
    if evaluate:
        spec["evaluate"] = evaluate
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _spy_train(monkeypatch):
    calls: list[str] = []
    real = run_module.train

    def spy(cfg, **kwargs):
        calls.append(cfg.output.name)
        return real(cfg, **kwargs)

    monkeypatch.setattr(experiment_module, "train", spy)
    return calls


def _forbid(monkeypatch, name, module=experiment_module):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} should not run")

    monkeypatch.setattr(module, name, fail)


def _rows(grid):
    with (grid / "summary.csv").open() as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def test_grid_expands_to_named_runs_and_unsplit_modes_ignore_the_cut(tmp_path):
    path = _experiment(tmp_path, "some-model", grid={
        "mode": ["splitlora", "centralized"], "rank": [1, 4], "cut": [1, 3], "train.lr": [0.1]})
    exp = load_experiment(path)
    names = [run.name for run in exp.runs]
    assert names == [
        "mode=splitlora_r=1_cut=1_train.lr=0.1", "mode=splitlora_r=1_cut=3_train.lr=0.1",
        "mode=splitlora_r=4_cut=1_train.lr=0.1", "mode=splitlora_r=4_cut=3_train.lr=0.1",
        "mode=centralized_r=1_train.lr=0.1", "mode=centralized_r=4_train.lr=0.1",
    ]
    run = exp.runs[3]
    assert (run.config.train.mode, run.config.lora.r, run.config.train.cut) == ("splitlora", 4, 3)
    assert run.config.train.lr == 0.1 and run.config.lora.alpha == 4
    assert run.config.output.dir == tmp_path / "grid" and run.config.output.name == run.name
    assert run_name({"seed": 1, "mode": "split", "rank": 2}) == "mode=split_r=2_seed=1"


def test_grid_errors_name_the_file_the_run_and_the_field(tmp_path):
    bad_value = _experiment(tmp_path, "m", grid={"rank": [2, 0]})
    with pytest.raises(ConfigError, match=r"exp.yaml \(run r=0\)[\s\S]*lora.r"):
        load_experiment(bad_value)
    bad_key = _experiment(tmp_path, "m", grid={"ranks": [2]})
    with pytest.raises(ConfigError, match="grid key 'ranks'.*mode, rank, cut"):
        load_experiment(bad_key)


def test_runner_skips_finished_runs_and_resumes_an_interrupted_grid(
    tmp_path, tiny_llama_dir, monkeypatch
):
    path = _experiment(tmp_path, tiny_llama_dir)
    grid = tmp_path / "grid"
    calls = _spy_train(monkeypatch)
    run_experiment(path, show_progress=False)
    assert calls == [SPLIT, CENTRAL]

    rows = _rows(grid)
    assert set(rows) == {SPLIT, CENTRAL}
    split_summary = json.loads((grid / SPLIT / "summary.json").read_text())
    assert float(rows[SPLIT]["eval_ppl"]) == pytest.approx(split_summary["eval_ppl"])
    assert int(rows[SPLIT]["bytes_sent"]) == split_summary["bytes_up"] + split_summary[
        "bytes_down"] > 0
    assert rows[SPLIT]["cut"] == "1" and rows[CENTRAL]["cut"] == ""
    assert rows[SPLIT]["BLEU"] == ""  # not scored
    assert split_summary["simulated_s"] > 0
    assert float(rows[SPLIT]["simulated_s"]) == pytest.approx(split_summary["simulated_s"])
    assert int(rows[SPLIT]["client_trainable_params"]) < int(
        rows[CENTRAL]["client_trainable_params"])
    for png in ("ppl_vs_steps.png", "ppl_vs_wall.png", "ppl_vs_simulated.png"):
        assert (grid / png).read_bytes()[:4] == b"\x89PNG"
    assert not (grid / "metrics.png").exists()
    md = (grid / "summary.md").read_text()
    assert "| splitlora | 2 | 1 | 2 | 0 |" in md and "2 of 2 runs finished" in md

    # everything finished: a second invocation trains nothing
    mtime = (grid / SPLIT / "summary.json").stat().st_mtime_ns
    _forbid(monkeypatch, "train")
    out = CliRunner().invoke(app, ["experiment", str(path), "--no-progress"])
    assert out.exit_code == 0, out.output
    assert out.output.count(": skip") == 2
    assert (grid / SPLIT / "summary.json").stat().st_mtime_ns == mtime

    # a run killed after a checkpoint (no summary.json) goes on from it, to the same end
    before = json.loads((grid / CENTRAL / "summary.json").read_text())
    (grid / CENTRAL / "summary.json").unlink()
    calls = _spy_train(monkeypatch)
    dry = CliRunner().invoke(app, ["experiment", str(path), "--dry-run"])
    assert "interrupted, resumes" in dry.output and calls == []
    run_experiment(path, show_progress=False)
    assert calls == [CENTRAL]
    after = json.loads((grid / CENTRAL / "summary.json").read_text())
    assert after["final_loss"] == before["final_loss"] and after["steps"] == before["steps"]

    # killed before any checkpoint (leftovers only): deleted and re-run alone
    (grid / CENTRAL / "summary.json").unlink()
    (grid / CENTRAL / "checkpoint" / "server.pt").unlink()
    (grid / CENTRAL / "leftover.txt").write_text("partial")
    calls = _spy_train(monkeypatch)
    dry = CliRunner().invoke(app, ["experiment", str(path), "--dry-run"])
    assert "interrupted, restarts" in dry.output and calls == []
    run_experiment(path, show_progress=False)
    assert calls == [CENTRAL]
    assert not (grid / CENTRAL / "leftover.txt").exists()
    assert (grid / CENTRAL / "summary.json").is_file() and set(_rows(grid)) == {SPLIT, CENTRAL}


def test_a_run_that_cannot_train_is_reported_and_the_grid_goes_on(tmp_path, tiny_llama_dir):
    """Cut 9 on the 4-block Llama: that run is refused inside train(); the run after it
    still trains, the summary says which failed and why, and the grid ends in an error
    that names it (the CLI exits 2)."""
    path = _experiment(tmp_path, tiny_llama_dir, grid={"mode": ["splitlora"], "rank": [2],
                                                       "cut": [9, 1], "seed": [0]})
    grid = tmp_path / "grid"
    bad, good = "mode=splitlora_r=2_cut=9_seed=0", SPLIT
    with pytest.raises(experiment_module.GridIncomplete, match=r"1 run\(s\) could not train"
                       r".*cut=9.*train.cut 9 is out of range") as failure:
        run_experiment(path, show_progress=False)
    assert set(failure.value.failed) == {bad}
    assert (grid / good / "summary.json").is_file() and set(_rows(grid)) == {good}
    md = (grid / "summary.md").read_text()
    assert "1 of 2 runs finished" in md and "## Runs that could not train" in md
    assert f"- `{bad}`: train.cut 9 is out of range" in md
    out = CliRunner().invoke(app, ["experiment", str(path), "--no-progress"])
    assert out.exit_code == 2 and f"{bad}: failed" in out.output and ": skip" in out.output


def test_summary_only_tables_the_finished_runs_and_trains_nothing(tmp_path, tiny_llama_dir,
                                                                 monkeypatch):
    path = _experiment(tmp_path, tiny_llama_dir)
    grid = tmp_path / "grid"
    run_experiment(path, show_progress=False)
    (grid / CENTRAL / "summary.json").unlink()  # as if that run were still training
    (grid / "summary.md").unlink()
    _forbid(monkeypatch, "train")
    _forbid(monkeypatch, "evaluate_run")
    out = CliRunner().invoke(app, ["experiment", str(path), "--summary-only"])
    assert out.exit_code == 0, out.output
    assert "1 of 2 runs finished" in out.output
    assert set(_rows(grid)) == {SPLIT}
    md = (grid / "summary.md").read_text()
    assert "1 of 2 runs finished" in md
    # the split of the simulated seconds, as the run recorded it
    summary = json.loads((grid / SPLIT / "summary.json").read_text())
    parts = summary["simulated_parts"]
    assert sum(parts.values()) == pytest.approx(summary["simulated_s"])
    row = _rows(grid)[SPLIT]
    assert parts["aggregation"] > 0
    assert float(row["simulated_aggregation_s"]) == pytest.approx(parts["aggregation"])
    assert float(row["simulated_probing_s"]) == 0


def test_runner_scores_runs_once_per_setting(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(evaluate_module, "score", lambda hyps, refs: Scores(
        bleu=0.5, nist=5.0, meteor=0.4, rouge_l=0.6, cider=1.5))
    grid_spec = {"mode": ["splitlora"], "rank": [2], "cut": [1], "seed": [0]}
    path = _experiment(tmp_path, tiny_llama_dir, grid=grid_spec,
                       evaluate={"max_mrs": 2, "num_beams": 1})
    grid = tmp_path / "grid"
    run_experiment(path, show_progress=False)
    row = _rows(grid)[SPLIT]
    assert (float(row["BLEU"]), float(row["CIDEr"])) == (0.5, 1.5)
    assert json.loads((grid / SPLIT / "scores.json").read_text())["num_mrs"] == 2
    assert (grid / "metrics.png").is_file()
    assert "| 50.00 |" in (grid / "summary.md").read_text()  # BLEU shown in percent

    _forbid(monkeypatch, "train")
    _forbid(monkeypatch, "evaluate_run")
    run_experiment(path, show_progress=False)  # trained and scored: nothing to do

    # new decoding settings: re-scored without retraining
    path = _experiment(tmp_path, tiny_llama_dir, grid=grid_spec,
                       evaluate={"max_mrs": 2, "num_beams": 2})
    scored: list[str] = []
    monkeypatch.setattr(experiment_module, "evaluate_run",
                        lambda run_dir, **kw: scored.append(run_dir.name))
    run_experiment(path, show_progress=False)
    assert scored == [SPLIT]


def test_runner_refuses_a_finished_run_made_with_another_config(
    tmp_path, tiny_llama_dir, monkeypatch
):
    grid_spec = {"mode": ["centralized"], "rank": [2]}
    run_experiment(_experiment(tmp_path, tiny_llama_dir, grid=grid_spec), show_progress=False)
    _forbid(monkeypatch, "train")
    changed = _experiment(tmp_path, tiny_llama_dir, grid=grid_spec, lr=0.02)
    with pytest.raises(ConfigError, match=r"train.lr: 0.01 there, 0.02 now"):
        run_experiment(changed, show_progress=False)


def test_variants_expand_with_their_settings_and_bad_ones_are_refused(tmp_path, tiny_llama_dir):
    variants = {"plain": {"train.mode": "splitlora"},
                "fast": {"train.mode": "splitlora", "train.lr": 0.05},
                "whole": {"train.mode": "federated"}}
    grid = {"seed": [0], "partition": ["iid", "dirichlet"], "variant": list(variants),
            "cut": [1]}
    path = _experiment(tmp_path, tiny_llama_dir, grid=grid)
    spec = yaml.safe_load(path.read_text())
    spec["variants"] = variants
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    exp = load_experiment(path)
    by_name = {run.name: run.config for run in exp.runs}
    assert list(by_name)[:3] == ["variant=plain_cut=1_seed=0_part=iid",
                                 "variant=fast_cut=1_seed=0_part=iid",
                                 "variant=whole_seed=0_part=iid"]  # no cut where unsplit
    fast = by_name["variant=fast_cut=1_seed=0_part=dirichlet"]
    assert (fast.train.lr, fast.train.mode, fast.data.partition) == (0.05, "splitlora",
                                                                      "dirichlet")
    assert by_name["variant=plain_cut=1_seed=0_part=iid"].train.lr == 0.01  # the base's

    for change, message in [
        ({"grid": {**grid, "variant": ["plain", "nope"]}}, r"grid.variant names nope, not in "
         r"variants \(plain, fast, whole\)"),
        ({"variants": {"plain": {"mode": "splitlora"}}, "grid": {**grid, "variant": ["plain"]}},
         r"variants.plain: mode is not a dotted config path"),
        ({"grid": {"seed": [0]}}, r"variants are defined but grid has no variant key"),
        ({"compare": {"method": "plain", "baselines": ["other"]}},
         r"compare names other, not in grid.variant"),
    ]:
        path.write_text(yaml.safe_dump({**spec, **change}, sort_keys=False))
        with pytest.raises(ConfigError, match=message):
            load_experiment(path)


def test_the_table_over_seeds_is_the_mean_and_spread_of_the_runs(tmp_path, tiny_llama_dir):
    grid = {"seed": [0, 1], "variant": ["slow", "fast"], "cut": [1]}
    path = _experiment(tmp_path, tiny_llama_dir, grid=grid)
    spec = yaml.safe_load(path.read_text())
    spec["base"]["eval"]["every"] = 1
    spec["variants"] = {"slow": {"train.mode": "splitlora", "train.lr": 0.001},
                        "fast": {"train.mode": "splitlora", "train.lr": 0.05}}
    spec["compare"] = {"method": "fast", "baselines": ["slow"]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    rows = run_experiment(path, show_progress=False)
    grid_dir = tmp_path / "grid"
    md = (grid_dir / "summary.md").read_text()
    assert (grid_dir / "loss_vs_simulated_iid.png").read_bytes()[:4] == b"\x89PNG"

    fast = [r for r in rows if r["variant"] == "fast"]
    ppl = [r["eval_ppl"] for r in fast]
    mean, spread = sum(ppl) / 2, abs(ppl[0] - ppl[1]) / math.sqrt(2)
    line = next(x for x in md.splitlines() if x.startswith("| fast | 1 | 2 |"))
    shown = experiment_module._fmt
    assert line.split(" | ")[3] == f"{shown(mean)} ± {shown(spread)}"
    curves = {r["run"]: experiment_module.loss_curve(grid_dir / r["run"]) for r in rows}
    assert all(len(c.seconds) == 2 and c.seconds[0] < c.seconds[1] for c in curves.values())
    # the curve's last point is the run's final held-out loss at its whole simulated time
    summary = json.loads((grid_dir / fast[0]["run"] / "summary.json").read_text())
    last = curves[fast[0]["run"]]
    assert (last.loss[-1], last.seconds[-1]) == (pytest.approx(summary["eval_loss"]),
                                                 pytest.approx(summary["simulated_s"]))
    assert "### Headline check: fast against slow" in md
    assert "- **iid**: perplexity" in md
