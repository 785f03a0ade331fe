"""Atomic, checksummed checkpoints of a party's state, loaded without running code.

A checkpoint is written to a temporary file in the same folder, flushed to disk and
renamed over the old one: a kill at any instant leaves either the previous checkpoint or
the new one, never half of one. The file is a short magic line, the payload
(``torch.save`` of plain containers and tensors) and the payload's SHA-256, so a
truncated, bit-flipped or foreign file is refused by name before anything is unpickled;
the payload is then read with ``weights_only=True``, which builds tensors and containers
only and never executes code from the file. Temporary files a killed writer left behind
are removed at the next save.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "atomic_save", "load_checkpoint", "trusted_types"]

MAGIC = b"HSPLITLORA-CHECKPOINT-1\n"
_DIGEST = hashlib.sha256().digest_size
_TRUSTED: list[type] = []  # classes of ours a checkpoint may hold (plain dataclasses)


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged or not one of ours; the text says which file
    and what to do."""


def trusted_types(classes: Iterable[type]) -> None:
    """Let checkpoints hold instances of ``classes`` (plain data classes of this package):
    ``weights_only`` loading refuses every other class."""
    for cls in classes:
        if cls not in _TRUSTED:
            _TRUSTED.append(cls)


class _Hashing(io.RawIOBase):
    """A write-only file that hashes what passes through it."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sha.update(b)
        return int(self.f.write(b))


def _clean_stale(path: Path) -> None:
    """Remove ``.{name}.{pid}.tmp`` files of writers that no longer run."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name.removeprefix(f".{path.name}.").removesuffix(".tmp")
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process


def atomic_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            hashing = _Hashing(f)
            torch.save(obj, hashing)
            f.write(hashing.sha.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself must survive a power cut too
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved at ``path``, verified first; :class:`CheckpointError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume (was the run "
                                "started with the same output.dir and output.name?)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror}); check its "
                              "permissions and the disk") from None
    start = len(MAGIC)
    if not raw.startswith(MAGIC):
        what = "is empty" if not raw else "is not an hsplitlora checkpoint (or predates "\
            "checksummed checkpoints)"
        raise CheckpointError(f"checkpoint {path} {what}; delete it and start the run "
                              "afresh, or point output.dir/output.name at the right run")
    payload, digest = raw[start:-_DIGEST], raw[-_DIGEST:]
    if len(raw) < start + _DIGEST or hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted (its checksum "
                              "does not match); restore it from a backup or start the run "
                              "afresh without --resume")
    try:
        with torch.serialization.safe_globals(list(_TRUSTED)):
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        what = f"an object of type {found.group(1)}" if found else "data torch cannot read"
        raise CheckpointError(f"checkpoint {path} holds {what}, which is not loaded since "
                              "loading it could run code from the file; only resume from "
                              "checkpoints this package wrote") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dictionary; point "
                              "output.dir/output.name at the right run")
    return state
