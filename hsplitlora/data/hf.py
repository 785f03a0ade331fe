"""Rows of a Hugging Face dataset: a hub id (when reachable) or a local file or folder.

Local sources need no network: a ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file
(read by the matching ``datasets`` builder) or a folder written by ``save_to_disk``.
A split may be sliced as ``datasets`` writes it (``train[:90%]``, ``train[100:200]``),
which is how one file gives both a training and a held-out part.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from hsplitlora.data.example import DataError

__all__ = ["is_local_source", "load_hf_rows"]

log = logging.getLogger(__name__)

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_SLICE = re.compile(r"^(?P<name>[\w.-]+)(?:\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\])?$")
_INSTALL = ("data.dataset 'hf' needs the `datasets` package: "
            "pip install 'hsplitlora[datasets]'")


def is_local_source(source: str) -> bool:
    """A path that exists, or one written like a path (so a typo is not sent to the hub)."""
    return Path(source).expanduser().exists() or source.startswith(("/", "./", "../", "~")) \
        or Path(source).suffix.lower() in _BUILDERS


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise DataError(_INSTALL) from err
    return datasets


def load_hf_rows(source: str, split: str) -> list[dict[str, Any]]:
    """The rows of ``split`` of ``source`` as plain dicts."""
    if _SLICE.match(split) is None:
        raise DataError(f"data split {split!r} is not a split name or slice; write e.g. "
                        "'train', 'train[:90%]' or 'test[:200]'")
    datasets = _datasets()
    if is_local_source(source):
        rows = _local(datasets, Path(source).expanduser(), split)
    else:
        try:
            rows = datasets.load_dataset(source, split=split)
        except Exception as err:  # the hub client raises many types; all mean "not loadable"
            raise DataError(
                f"cannot load split {split!r} of {source!r} from the Hugging Face hub: "
                f"{type(err).__name__}: {str(err)[:300]}. Check the id and split; offline, "
                "save it once where the hub is reachable (datasets.load_dataset(...)."
                "save_to_disk(DIR)) or export it to JSONL, and set data.source to that "
                "folder or file") from err
    out = [dict(row) for row in rows]
    if not out:
        raise DataError(f"split {split!r} of {source} holds no rows")
    log.info("loaded %d rows from %s[%s]", len(out), source, split)
    return out


def _local(datasets: Any, path: Path, split: str) -> Any:
    if not path.exists():
        raise DataError(f"data.source {path} does not exist; give an existing .json, .jsonl, "
                        ".csv or .parquet file, a save_to_disk folder, or a hub id")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # not a save_to_disk folder
            raise DataError(f"{path} is not a folder written by save_to_disk ({err}); give "
                            "such a folder or a data file") from err
        return _slice(loaded, split, path)
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"data.source {path}: cannot read {path.suffix!r} files; give a .json, "
                        ".jsonl, .csv or .parquet file or a save_to_disk folder")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split=split)
    except ValueError as err:  # an unknown split name
        raise DataError(f"{path}: {err}; a single data file has the one split 'train' "
                        "(slice it: 'train[:90%]' / 'train[90%:]')") from err
    except Exception as err:  # the builders' parse errors
        raise DataError(f"{path} could not be read as {builder}: {type(err).__name__}: "
                        f"{str(err)[:300]}") from err


def _slice(loaded: Any, split: str, path: Path) -> Any:
    """``split`` of what ``load_from_disk`` returned (a Dataset or a DatasetDict)."""
    m = _SLICE.match(split)
    assert m is not None
    name = m["name"]
    if hasattr(loaded, "keys"):  # DatasetDict
        if name not in loaded:
            raise DataError(f"{path} has splits {sorted(loaded)}, not {name!r}; set data.split "
                            "(and data.eval_split) to one of them")
        loaded = loaded[name]
    n = len(loaded)

    def bound(text: str | None, default: int) -> int:
        if not text:
            return default
        value = round(n * float(text[:-1]) / 100) if text.endswith("%") else int(text)
        return max(0, min(n, value if value >= 0 else n + value))

    start, stop = bound(m["start"], 0), bound(m["stop"], n)
    return loaded.select(range(start, stop)) if (start, stop) != (0, n) else loaded
