"""Evaluating a finished run: files in the official scorer's formats, metrics, perplexity."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from hsplitlora.cli import app
from hsplitlora.config import RunConfig
from hsplitlora.data.e2e import group_references, load_e2e
from hsplitlora.eval import evaluate as evaluate_module
from hsplitlora.eval.evaluate import evaluate_run, spread_subset
from hsplitlora.eval.metrics import METRIC_NAMES, Scores, load_fixture
from hsplitlora.train.run import train
from tests.conftest import E2E

TEST_SET = E2E / "original" / "testset_w_refs.csv"
FAKE = Scores(bleu=0.5, nist=5.0, meteor=0.4, rouge_l=0.6, cider=1.5)


def _unwrapped(text: str) -> str:
    """CLI output without rich's line wrapping."""
    return " ".join(text.split())


def _tiny_run(tmp_path, model_dir, name="run"):
    cfg = RunConfig.model_validate({
        "model": {"name": str(model_dir)},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "data": {"train_files": [str(E2E / "original" / "devset.csv")], "eval_file": str(TEST_SET),
                 "max_train_examples": 16, "max_length": 160},
        "train": {"mode": "splitlora", "num_clients": 2, "cut": 1, "steps": 2, "batch_size": 2,
                  "lr": 0.01, "precision": "fp32"},
        "eval": {"max_examples": 6, "max_mrs": 3, "num_beams": 2},
        "output": {"dir": str(tmp_path), "name": name, "sample_prompt": None},
    })
    train(cfg, show_progress=False)
    return tmp_path / name


def test_spread_subset_is_even_and_covers_the_range():
    assert spread_subset(10, None) == list(range(10))
    assert spread_subset(10, 50) == list(range(10))
    assert spread_subset(630, 5) == [0, 126, 252, 378, 504]
    picked = spread_subset(7, 3)
    assert len(set(picked)) == 3 and picked[0] == 0 and max(picked) < 7


def test_evaluate_run_writes_scorer_files_scores_and_perplexity(tmp_path, tiny_llama_dir):
    run = _tiny_run(tmp_path, tiny_llama_dir)
    result = evaluate_run(run)  # eval.max_mrs 3, eval.num_beams 2 from the run's config

    mrs, refs = group_references(load_e2e([TEST_SET]))
    expected_refs = [refs[i] for i in spread_subset(len(mrs), 3)]
    hyps, read_refs = load_fixture(run / "predictions.txt", run / "references.txt")
    assert len(hyps) == 3 and read_refs == expected_refs  # the scorer reads what we meant
    assert all("\n" not in h for h in hyps)

    saved = json.loads((run / "scores.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert result["num_mrs"] == 3 and result["settings"]["num_beams"] == 2
    for name in METRIC_NAMES:
        assert (result[name] is None) == (name in result["unavailable"]), name
    assert 0.0 <= result["BLEU"] <= 1.0 and result["NIST"] >= 0.0
    # the same held-out sample, model and precision as training's own final evaluation
    summary = json.loads((run / "summary.json").read_text())
    assert result["eval_examples"] == 6
    assert result["eval_ppl"] == pytest.approx(summary["eval_ppl"], rel=1e-5)


def test_cli_evaluate_prints_the_metrics(tmp_path, tiny_llama_dir, monkeypatch):
    run = _tiny_run(tmp_path, tiny_llama_dir)
    monkeypatch.setattr(evaluate_module, "score", lambda hyps, refs: FAKE)
    out = CliRunner().invoke(app, ["evaluate", str(run), "--greedy", "--max-mrs", "2",
                                   "--no-progress", "--untuned"])
    assert out.exit_code == 0, out.output
    assert "0.5000" in out.output and "CIDEr" in out.output and "eval_ppl" in out.output
    assert "untuned" in out.output and "fine-tuned" in out.output
    saved = json.loads((run / "scores.json").read_text())
    # the untuned base model, on the same MRs, has a higher held-out loss than the run
    assert saved["untuned"]["BLEU"] == 0.5
    assert saved["untuned"]["eval_loss"] > saved["eval_loss"]
    assert len((run / "untuned_predictions.txt").read_text().splitlines()) == 2
    assert saved["settings"]["num_beams"] == 1 and saved["num_mrs"] == 2
    assert saved["BLEU"] == 0.5
    assert len((run / "predictions.txt").read_text().splitlines()) == 2


def test_cli_evaluate_rejects_what_is_not_a_finished_run(tmp_path, tiny_llama_dir):
    missing = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "nope does not exist" in _unwrapped(missing.output)

    run = _tiny_run(tmp_path, tiny_llama_dir)
    shutil.rmtree(run / "adapter")
    partial = CliRunner().invoke(app, ["evaluate", str(run)])
    assert partial.exit_code == 2
    assert "not a finished run: adapter/adapter_model.safetensors is missing" in _unwrapped(
        partial.output)


def _nan_weights(path):
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    key = sorted(state)[0]
    state[key] = state[key].clone().fill_(float("nan"))
    save_file(state, path)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p.write_bytes(p.read_bytes()[:40]), "is damaged and cannot be read"),
    (lambda p: p.write_bytes(b""), "is damaged and cannot be read"),
    (lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]), "is damaged and cannot be read"),
    (_nan_weights, "holds non-finite weights"),
])
def test_cli_evaluate_refuses_a_corrupted_adapter_clearly(tmp_path, tiny_llama_dir, damage,
                                                          message):
    run = _tiny_run(tmp_path, tiny_llama_dir)
    adapter = run / "adapter" / "adapter_model.safetensors"
    damage(adapter)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--no-progress"])
    assert result.exit_code == 2, result.output
    text = _unwrapped(result.output)
    assert "adapter_model.safetensors" in "".join(result.output.split())  # names the file
    assert message in text
    assert not (run / "scores.json").exists()  # no score for a broken adapter
