"""Users' own examples, one JSON object per line, in any of the formats of data/formats.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from hsplitlora.data._text import read_utf8
from hsplitlora.data.example import DataError, Example
from hsplitlora.data.formats import (
    _FIX,
    ChatTemplate,
    detect_format,
    rename_columns,
    to_example,
)
from hsplitlora.data.formats import _json_type as _json_type

__all__ = ["load_jsonl", "read_jsonl"]

logger = logging.getLogger(__name__)


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The file's records with their line numbers; blank lines are skipped."""
    path = Path(path)
    records = []
    # split("\n") rather than splitlines(): JSON strings may hold U+2028, which is not a line end.
    for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno}); {_FIX}."
            ) from err
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{lineno}: found a JSON {_json_type(record)}, not an object; {_FIX}.")
        records.append((lineno, record))
    if not records:
        raise DataError(f"{path}: no examples found; {_FIX}.")
    return records


def load_jsonl(path: Path, fmt: Literal["auto", "prompt_completion", "messages", "alpaca"] = "auto",
               *, columns: Mapping[str, str] | None = None,
               chat: ChatTemplate | None = None) -> list[Example]:
    """Load a JSONL file of prompt/completion, chat or alpaca records.

    ``fmt="auto"`` takes the format from the first record's keys and holds every other
    record to it. A prompt/completion pair's completion becomes the target verbatim, so
    start it with a space (or newline) where a word boundary should separate it from the
    prompt. Keys the format does not read go into `meta` as strings (non-strings
    JSON-encoded), so they can drive grouping or labels in partitioning (``label_key``).
    """
    path = Path(path)
    records = [(n, rename_columns(r, columns or {})) for n, r in read_jsonl(path)]
    first_line, first = records[0]
    chosen = detect_format(first, f"{path}:{first_line}") if fmt == "auto" else fmt
    examples = [to_example(r, chosen, f"{path}:{n}", chat) for n, r in records]
    logger.info("loaded %d %s examples from %s", len(examples), chosen, path)
    return examples
