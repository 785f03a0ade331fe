"""Users' own prompt/completion pairs, one JSON object per line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hsplitlora.data._text import read_utf8
from hsplitlora.data.example import DataError, Example

__all__ = ["load_jsonl"]

logger = logging.getLogger(__name__)

_EXPECTED = (
    'each non-blank line must be one JSON object like {"prompt": "Question: ...\\nAnswer:", '
    '"completion": " the answer"} with string values; other keys are kept as metadata'
)


def load_jsonl(path: Path) -> list[Example]:
    """Load ``{"prompt": ..., "completion": ...}`` lines; blank lines are skipped.

    The completion becomes the target verbatim, so start it with a space (or newline) where a
    word boundary should separate it from the prompt. Extra keys go into `meta` as strings
    (non-strings JSON-encoded) so they can drive grouping or labels in partitioning, e.g. a
    "source" key with ``group_key="source"``.
    """
    path = Path(path)
    examples: list[Example] = []
    # split("\n") rather than splitlines(): JSON strings may hold U+2028, which is not a line end.
    for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):
        if line.strip():
            examples.append(_parse_line(line, path, lineno))
    if not examples:
        raise DataError(f"{path}: no examples found; {_EXPECTED}.")
    logger.info("loaded %d examples from %s", len(examples), path)
    return examples


def _parse_line(line: str, path: Path, lineno: int) -> Example:
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno}); {_EXPECTED}."
        ) from err
    if not isinstance(record, dict):
        raise DataError(
            f"{path}:{lineno}: found a JSON {_json_type(record)}, not an object; {_EXPECTED}."
        )
    for key in ("prompt", "completion"):
        if key not in record:
            raise DataError(f"{path}:{lineno}: missing key {key!r}; {_EXPECTED}.")
        if not isinstance(record[key], str):
            raise DataError(
                f"{path}:{lineno}: {key!r} is a JSON {_json_type(record[key])}, not a string; "
                f"{_EXPECTED}."
            )
    meta = {
        key: value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        for key, value in record.items()
        if key not in ("prompt", "completion")
    }
    return Example(record["prompt"], record["completion"], meta)


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, the vocabulary of the person fixing the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"
