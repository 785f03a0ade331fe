"""The device a run's parties compute on (``train.device``)."""

from __future__ import annotations

import torch

from hsplitlora.errors import UserError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a CUDA
    device that is not there is refused with what is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not visible:
            raise UserError(f"train.device is {name!r} but no CUDA device is visible here: "
                            "set train.device to 'auto' or 'cpu'")
        if device.index is not None and device.index >= visible:
            raise UserError(f"train.device is {name!r} but only {visible} CUDA device(s) "
                            f"are visible (cuda:0..cuda:{visible - 1})")
    return device
