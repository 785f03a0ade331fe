"""The run configuration: YAML in, validated pydantic models out, errors a person can act on.

Each section lives with the package it configures (``models/config.py``: model, lora;
``data/config.py``; ``train/config.py``: train, ray, output; ``hetero/config.py``;
``eval/config.py``; ``privacy/config.py``; ``transport/config.py``: net), every default
there, once; this module composes them into :class:`RunConfig`, checks what spans
sections, and reads YAML with overrides. The CLI help, the resolved ``config.yaml``
written into each run folder and the validation messages all come from these models.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from hsplitlora.data.config import DataConfig
from hsplitlora.errors import UserError
from hsplitlora.eval.config import EvalConfig
from hsplitlora.hetero.config import HeteroConfig
from hsplitlora.models.config import LoraConfig, ModelConfig
from hsplitlora.modes import MODES, SHARED_SIDE, Mode, mode_of
from hsplitlora.privacy.config import PrivacyConfig, delta_problem
from hsplitlora.section import Section
from hsplitlora.train.config import OutputConfig, RayConfig, TrainConfig
from hsplitlora.transport.config import NetConfig

__all__ = ["ConfigError", "RunConfig", "apply_overrides", "load_config"]

REPO_ROOT = Path(__file__).resolve().parent.parent  # shipped configs name data from here

class ConfigError(UserError, ValueError):
    """A configuration file or override is invalid; the message says where and how to fix."""


class RunConfig(Section):
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
            if self.server_side == "shared" and (aggregator not in SHARED_SIDE
                                                 or self.hetero.federated):
                whose = ("hetero.server_side 'shared'" if self.hetero.server_side else
                         f"{self.train.mode}'s shared server side")
                raise ValueError(
                    f"{whose} needs a split run with an aggregator it can take part in "
                    f"({', '.join(sorted(SHARED_SIDE))}), not {aggregator!r}"
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
