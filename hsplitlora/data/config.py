"""The ``data`` section: which dataset and files, how examples are cut and how shards are
drawn. The E2E defaults are the copy shipped in ``data/e2e``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from hsplitlora.data.formats import COLUMN_ROLES
from hsplitlora.section import Section

__all__ = ["E2E_DIR", "DataConfig"]

E2E_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "e2e"
_DEFAULT_TRAIN_FILES = [E2E_DIR / "original" / "devset.csv",
                        E2E_DIR / "cleaned" / "devel-fixed.no-ol.csv"]
_DEFAULT_EVAL_FILE = E2E_DIR / "original" / "testset_w_refs.csv"


class DataConfig(Section):
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
    pad_to_multiple_of: int = Field(
        1, ge=1, description="round each batch's width up to a multiple of this (8 or 16 "
        "bounds the kernels' per-shape caches on long or many-client runs; 1 = the longest "
        "example's width, exactly as before)")
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
    def _padding_fits(self) -> DataConfig:
        # A padded width must stay within max_length: a served run's main server refuses
        # batches wider than that (transport/validate.py).
        if self.max_length % self.pad_to_multiple_of:
            raise ValueError(f"data.pad_to_multiple_of {self.pad_to_multiple_of} does not "
                             f"divide data.max_length {self.max_length}, so a padded batch "
                             "could be wider than max_length; choose a divisor (8 or 16 for "
                             "the default 128)")
        return self

    @model_validator(mode="after")
    def _files_exist(self) -> DataConfig:
        if self.dataset == "e2e_hub":  # split names, not files
            return self
        unknown = sorted(set(self.columns) - set(COLUMN_ROLES))
        if unknown:
            raise ValueError(f"data.columns keys {unknown} are not format keys; use "
                             f"{', '.join(COLUMN_ROLES)} (mapped to your column names)")
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
