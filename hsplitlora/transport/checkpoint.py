"""Atomic checkpoints of a party's state, so a killed process resumes where it stood.

A checkpoint is written to a temporary file in the same folder, flushed to disk and
renamed over the old one: a kill at any instant leaves either the previous checkpoint or
the new one, never half of one.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hsplitlora.models.lora import load_lora_state, lora_state
from hsplitlora.roles.server import MainServer

__all__ = ["atomic_save", "load_checkpoint", "load_server_state", "server_state"]


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


def server_state(server: MainServer) -> dict[str, Any]:
    """Adapters and optimizer state of every distinct server segment (one under SFL-V2,
    one per client under SFL-V1), deep-copied so later steps cannot alter them."""
    groups: dict[int, dict[str, Any]] = {}
    for cid, segment in server.segments.items():
        group = groups.setdefault(id(segment), {
            "clients": [], "adapter": lora_state(segment),
            "optimizer": copy.deepcopy(server.optimizers[cid].state_dict())})
        group["clients"].append(cid)
    return {"groups": list(groups.values())}


def load_server_state(server: MainServer, state: Mapping[str, Any]) -> None:
    for group in state["groups"]:
        first = group["clients"][0]
        load_lora_state(server.segments[first], group["adapter"])
        server.optimizers[first].load_state_dict(copy.deepcopy(group["optimizer"]))
