"""``hsplitlora serve`` / ``join`` / ``fedserver`` from one YAML file, as a user runs them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hsplitlora.cli import app
from hsplitlora.config import RunConfig
from tests.conftest import E2E
from tests.transport import harness

pytestmark = pytest.mark.skipif("net" not in RunConfig.model_fields,
                                reason="RunConfig has no net section yet")


def _write_config(tmp_path, model_dir, fed_port):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("0: secret-zero\n1: secret-one\nserver: secret-server\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"""
model: {{name: {model_dir}}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
data:
  train_files: [{E2E / 'original' / 'devset.csv'}]
  eval_file: null
  max_train_examples: 40
  max_length: 160
train: {{mode: splitlora, num_clients: 2, cut: 1, steps: 3, batch_size: 2, agg_interval: 2,
        lr: 0.01, precision: fp32, threads: 1}}
eval: {{max_examples: 0}}
output: {{dir: {tmp_path / 'runs'}, name: cli, sample_prompt: null}}
net: {{port: 0, fed_address: "127.0.0.1:{fed_port}", fed_port: {fed_port},
      tokens_file: {tokens}, step_timeout_s: 20, join_timeout_s: 60}}
""")
    return config


def test_serve_fedserver_and_join_from_one_config(tmp_path, tiny_llama_dir):
    config = _write_config(tmp_path, tiny_llama_dir, harness.free_port())
    fed_port, port = tmp_path / "fed-port", tmp_path / "port"
    fed = harness.start_cli("fed", "fedserver", "-c", str(config), "--port-file", str(fed_port))
    harness.wait_for(fed_port.exists, 60, "the fed server")
    server = harness.start_cli("server", "serve", "-c", str(config), "--port-file", str(port),
                               "--no-progress")
    harness.wait_for(port.exists, 60, "the main server")
    address = f"127.0.0.1:{port.read_text()}"
    clients = []
    for cid, secret in enumerate(["secret-zero", "secret-one"]):
        (tmp_path / f"token-{cid}").write_text(secret + "\n")
        clients.append(harness.start_cli(
            f"client {cid}", "join", "-c", str(config), "--client-id", str(cid), "--server",
            address, "--token-file", str(tmp_path / f"token-{cid}")))
    assert harness.finish([server, fed, *clients], 90) == [0, 0, 0, 0]
    runs = tmp_path / "runs"
    client_half = load_file(runs / "cli-fed" / "client_adapter.safetensors")
    server_half = load_file(runs / "cli" / "server_adapter.safetensors")
    for cid in (0, 1):
        mine = load_file(runs / f"cli-client-{cid}" / "client_adapter.safetensors")
        assert set(mine) == set(client_half)
        assert all(torch.equal(mine[k], client_half[k]) for k in mine)
        assert (runs / f"cli-client-{cid}" / "checkpoint.pt").is_file()
    assert all(int(k.split(".")[2]) >= 1 for k in server_half)  # blocks [cut, L) only
    assert not (runs / "cli" / "adapter").exists()
    # The same run folder as an in-process run: loss plot, summary, and the PEFT adapter
    # once the halves are joined (by `export`, which finds <run>-fed by itself).
    assert (runs / "cli" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((runs / "cli" / "summary.json").read_text())
    assert summary["mode"] == "splitlora" and summary["steps"] == 6
    exported = CliRunner().invoke(app, ["export", str(runs / "cli")])
    assert exported.exit_code == 0, exported.output
    joined = load_file(runs / "cli" / "adapter" / "adapter_model.safetensors")
    assert set(joined) == {f"base_model.model.{k}" for k in {**client_half, **server_half}}


def test_join_with_a_wrong_token_exits_with_a_clear_error(tmp_path, tiny_llama_dir):
    config = _write_config(tmp_path, tiny_llama_dir, harness.free_port())
    port = tmp_path / "port"
    server = harness.start_cli("server", "serve", "-c", str(config), "--port-file", str(port),
                               "--no-progress", "--set", "net.fed_address=null",
                               "--set", "net.join_timeout_s=5")
    try:
        harness.wait_for(port.exists, 60, "the main server")
        (tmp_path / "bad").write_text("not-the-secret")
        result = CliRunner().invoke(app, [
            "join", "-c", str(config), "--client-id", "0", "--server",
            f"127.0.0.1:{port.read_text()}", "--token-file", str(tmp_path / "bad")])
    finally:
        server.kill()
    assert result.exit_code == 1
    assert "refused us: wrong token for party '0'" in " ".join(result.output.split())
