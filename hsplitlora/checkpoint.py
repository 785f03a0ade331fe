"""Atomic checkpoints of a party's state, so a killed process resumes where it stood.

A checkpoint is written to a temporary file in the same folder, flushed to disk and
renamed over the old one: a kill at any instant leaves either the previous checkpoint or
the new one, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "load_checkpoint"]


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
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
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume (was the run "
                                "started with the same output.dir and output.name?)")
    return torch.load(path, map_location="cpu", weights_only=False)
