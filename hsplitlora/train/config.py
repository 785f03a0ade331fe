"""The ``train``, ``ray`` and ``output`` sections: the mode and its schedule, the
optimizer, where the roles run, and where a run's results go."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from hsplitlora.modes import mode_names
from hsplitlora.section import Section

__all__ = ["OutputConfig", "RayConfig", "TrainConfig"]

ModeName = Literal[mode_names()]  # type: ignore[valid-type]  # the registry's modes
E2E_SAMPLE = ("name[The Vaults], eatType[pub], food[French], priceRange[more than £30], "
              "area[riverside], familyFriendly[no], near[Café Adriatic]")


class TrainConfig(Section):
    mode: ModeName = Field("splitlora", description="training mode (hsplitlora/modes/: one "
                           "module each)")
    num_clients: int = Field(4, ge=1, description="number of clients")
    cut: int = Field(3, ge=0, description="blocks [0, cut) run on the clients")
    tail: int = Field(0, ge=0, description="U-shaped split: the clients also keep the last "
                      "`tail` blocks, the final norm, the LM head and the loss, so labels never "
                      "leave them (the server runs blocks [cut, L - tail)); 0 = the server "
                      "holds everything past the cut")
    steps: int = Field(100, ge=1, description="local steps per client (centralized runs "
                       "steps x num_clients steps, so every mode sees the same examples)")
    batch_size: int = Field(4, ge=1, description="examples per local step")
    agg_interval: int = Field(
        10, ge=1, description="I: local steps between adapter aggregations (split mode: "
        "steps a client trains before handing the adapter on)"
    )
    agg_weighting: Literal["samples", "uniform"] = Field(
        "samples", description="FedAvg weights: shard sizes, or equal"
    )
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (LoRA weights only)")
    adam_eps: float = Field(1e-6, gt=0, description="AdamW epsilon")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps (each party's own)")
    schedule: Literal["linear", "constant"] = Field("linear", description="LR decay after warm-up")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the "
                                   "cross-entropy loss (SplitLoRA's E2E recipe uses 0.1)")
    grad_clip: float = Field(0.0, ge=0, description="max grad norm per party; 0 = off")
    seed: int = Field(42, description="seeds data order, partition and adapter init")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 autocast, or fp32")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto (cuda if present), cpu, cuda or cuda:N")
    threads: int | None = Field(None, ge=1, description="torch threads; null = CPU cores")
    keep_memory: bool = Field(True, description="glibc: keep freed memory for reuse instead "
                              "of returning it to the system (no page faults on each step's "
                              "large temporaries; about 10 % faster CPU steps); false = the "
                              "system default")
    compile: bool = Field(False, description="torch.compile each decoder block's training "
                          "forward (one compiled graph shared by all blocks), fusing the "
                          "elementwise work between matmuls: 20-33 % faster SmolLM2 steps "
                          "on a 2-core AMX Xeon, after a one-off compile of 25-40 s (cached "
                          "on disk); needs a C++ compiler (CPU) or a C compiler (CUDA); "
                          "evaluation and generation stay eager")
    backend: Literal["inprocess", "ray"] = Field(
        "inprocess", description="where the roles run: all in this process, or each client "
        "and the main server as a Ray actor (see the ray section)")
    log_every: int = Field(0, ge=0, description="rounds between logged loss lines when there is "
                           "no terminal for the progress bar; 0 = about 20 lines per run")


class RayConfig(Section):
    """The Ray backend (``train.backend: ray``): one actor per client and for the main
    server (for each learner in the centralized and federated modes)."""

    address: str | None = Field(None, description="an existing cluster ('auto', or "
                                "'ray://head:10001'); null = start a local Ray")
    client_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each client actor "
                               "(also its torch threads, unless train.threads is set)")
    client_gpus: float = Field(0.0, ge=0, description="GPUs per client actor (fractions share)")
    server_cpus: float = Field(1.0, gt=0, description="CPUs reserved by the main server actor")
    server_gpus: float = Field(0.0, ge=0, description="GPUs for the main server actor")
    runtime_env: dict[str, Any] | None = Field(
        None, description="Ray runtime_env for the actors on a cluster whose nodes lack "
        "hsplitlora, e.g. {pip: [hsplitlora]} or {py_modules: [...]}")
    start_timeout_s: float = Field(300.0, gt=0, description="how long to wait for the "
                                   "cluster to place and start every actor")


class OutputConfig(Section):
    dir: Path = Field(Path("runs"), description="parent folder of run folders")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="experiment trackers that also get every step's "
        "loss, lr, tokens and bytes, aggregations, evaluations, simulated time and the "
        "summary (metrics.jsonl is always written); each needs its extra, e.g. "
        "pip install 'hsplitlora[wandb]'")
    project: str = Field("hsplitlora", description="W&B project / MLflow experiment name")
    wandb_mode: Literal["online", "offline"] | None = Field(
        None, description="W&B mode; offline writes the run under <run folder>/wandb for a "
        "later `wandb sync`; null = W&B's own default (WANDB_MODE)")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; null = a local file store in "
        "<run folder>/mlruns (no server, no network)")
    name: str | None = Field(None, description="run folder name; null = <mode>-<timestamp>")
    sample_prompt: str | None = Field(
        E2E_SAMPLE,
        description="generated from before and after training: an E2E meaning "
        "representation, or for jsonl / hf data a request written into the data's format "
        "(a user turn for chat data); 'auto' = the first held-out (else training) example's "
        "prompt, the default for jsonl / hf data; null = skip",
    )
