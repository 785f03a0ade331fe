"""The examples a config names: E2E CSVs, the hub's E2E, JSONL files or a Hugging Face
dataset, in whichever record format (data/formats.py), for training or held out."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hsplitlora.data.e2e import format_prompt, load_e2e, load_e2e_hub
from hsplitlora.data.example import DataError, Example
from hsplitlora.data.formats import ChatTemplate, Format, detect_format, rename_columns, to_example
from hsplitlora.data.formats import sample_prompt as _in_format
from hsplitlora.data.jsonl import read_jsonl

if TYPE_CHECKING:
    from hsplitlora.data.config import DataConfig

__all__ = ["check_labels", "load_examples", "sample_text", "subsample"]

Part = Literal["train", "eval"]


def load_examples(data: DataConfig, part: Part, tokenizer: Any = None) -> list[Example]:
    """The training examples, or the held-out ones ([] when the config names none).

    ``tokenizer`` renders chat data with its chat template; without one (checking the
    data before the model loads) chat examples hold their raw texts only.
    """
    return _load(data, part, tokenizer)[0]


def _load(data: DataConfig, part: Part, tokenizer: Any) -> tuple[list[Example], Format | None]:
    if part == "eval" and not (data.eval_split if data.dataset == "hf" else data.eval_file):
        return [], None
    if data.dataset == "e2e":
        files = data.train_files if part == "train" else [data.eval_file]
        return load_e2e([Path(f) for f in files if f is not None], require_refs=True), None
    if data.dataset == "e2e_hub":
        splits = data.train_files if part == "train" else [data.eval_file]
        return [ex for s in splits for ex in load_e2e_hub(str(s), data.hub_id)], None
    sources: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = []
    if data.dataset == "hf":
        from hsplitlora.data.hf import load_hf_rows

        assert data.source is not None
        split = data.split if part == "train" else str(data.eval_split)
        rows = load_hf_rows(data.source, split)
        sources.append((f"{data.source}[{split}]",
                        [(f"{data.source}[{split}] row {i}", r) for i, r in enumerate(rows)]))
    else:
        files = data.train_files if part == "train" else [data.eval_file]
        for f in files:
            assert f is not None
            sources.append((str(f), [(f"{f}:{n}", r) for n, r in read_jsonl(Path(f))]))
    examples: list[Example] = []
    fmt: Format | None = None
    chat: ChatTemplate | None = None
    for _, records in sources:
        records = [(where, rename_columns(r, data.columns)) for where, r in records]
        if fmt is None:
            where, first = records[0]
            fmt = detect_format(first, where) if data.format == "auto" else data.format
            if fmt == "messages" and tokenizer is not None:
                chat = ChatTemplate(tokenizer, data.chat_template)
        examples += [to_example(r, fmt, where, chat) for where, r in records]
    return examples, fmt


def subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """``data.max_train_examples`` of them, drawn by the run's seed, in file order."""
    if not limit or limit >= len(examples):
        return examples
    rng = random.Random(seed)
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), limit))]


def check_labels(data: DataConfig, examples: list[Example]) -> None:
    """A Dirichlet partition draws per label; without the label every example would be
    one class, which is IID under another name: refuse it, naming the keys there are."""
    if data.partition != "dirichlet" or any(data.label_key in ex.meta for ex in examples):
        return
    keys = sorted({k for ex in examples for k in ex.meta})
    raise DataError(
        f"data.partition 'dirichlet' needs a label, and no example has the field "
        f"{data.label_key!r} (data.label_key); "
        + (f"set data.label_key to one of {keys}" if keys else "the data has no extra fields "
           "to use as one: add a label column")
        + ", or use data.partition 'iid'")


def sample_text(data: DataConfig, text: str | None, tokenizer: Any) -> str | None:
    """The prompt generated from before and after training, in the data's own format."""
    if not text:
        return None
    if text == "auto":
        for part in ("eval", "train"):
            examples = load_examples(data, part, tokenizer)  # type: ignore[arg-type]
            if examples:
                return examples[0].prompt
        raise DataError("no examples to take output.sample_prompt 'auto' from")
    if data.dataset in ("e2e", "e2e_hub"):
        return format_prompt(text)
    _, fmt = _load(data, "train", None)
    assert fmt is not None
    chat = ChatTemplate(tokenizer, data.chat_template) if fmt == "messages" else None
    return _in_format(text, fmt, chat)
