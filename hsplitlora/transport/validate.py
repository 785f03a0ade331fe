"""Check every arriving tensor before use: names, dtypes, shapes, then values.

Pure functions over a parsed header and the loaded tensors. A layout names each expected
tensor with its safetensors dtype and a shape whose dimensions are numbers (must match) or
symbols such as ``"B"`` (bound on first use, equal wherever they recur, and within the
limit given for them), so one layout covers every batch of a run.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hsplitlora.transport.wire import Header, WireError

__all__ = ["Layout", "Limit", "check_activation_values", "check_finite", "check_header",
           "check_magnitude", "loss_meta"]

Layout = Mapping[str, tuple[str, tuple[int | str, ...]]]
Limit = tuple[int, int, str]  # (lowest, highest, where the bound comes from)


def _shape_text(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def check_header(header: Header, layout: Layout, limits: Mapping[str, Limit],
                 what: str) -> dict[str, int]:
    """Refuse a header that does not hold exactly ``layout``; return the bound symbols."""
    missing = sorted(set(layout) - set(header.tensors))
    extra = sorted(set(header.tensors) - set(layout))
    if missing or extra:
        raise WireError(f"{what}: expected tensors {sorted(layout)}, missing {missing}, "
                        f"unexpected {extra}")
    bound: dict[str, int] = {}
    for name, (dtype, shape) in layout.items():
        got_dtype, got_shape = header.tensors[name]
        if got_dtype != dtype:
            raise WireError(f"{what}: tensor {name!r} has dtype {got_dtype}, expected {dtype}")
        ok = len(got_shape) == len(shape)
        for want, got in zip(shape, got_shape, strict=True) if ok else ():
            if isinstance(want, int):
                ok = ok and got == want
            elif want in bound:
                ok = ok and got == bound[want]
            else:
                low, high, source = limits[want]
                if not low <= got <= high:
                    raise WireError(f"{what}: tensor {name!r} has shape {tuple(got_shape)}; "
                                    f"dimension {want} = {got} is outside [{low}, {high}] "
                                    f"({source})")
                bound[want] = got
        if not ok:
            expected = tuple(bound.get(d, d) if isinstance(d, str) else d for d in shape)
            raise WireError(f"{what}: tensor {name!r} has shape {tuple(got_shape)}, expected "
                            f"{_shape_text(expected)}")
    return bound


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise WireError(f"{what}: tensor {name!r} holds {bad} non-finite values (NaN/inf)")


def check_magnitude(tensors: Mapping[str, torch.Tensor], bound: float, what: str) -> None:
    """Refuse float tensors with a value beyond ``bound`` (finite values can poison too:
    3e38 squares to inf inside the first norm layer)."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            peak = float(t.detach().abs().max())
            if peak > bound:
                raise WireError(f"{what}: tensor {name!r} holds a value of magnitude {peak:.3g}, "
                                f"beyond the bound {bound:.3g} (net.max_activation)")


def check_activation_values(tensors: Mapping[str, torch.Tensor], vocab_size: int,
                            what: str) -> None:
    """Values the server's loss would otherwise trip over (or silently mis-train on)."""
    check_finite(tensors, what)
    mask = tensors["attention_mask"]
    if bool(((mask != 0) & (mask != 1)).any()):
        raise WireError(f"{what}: attention_mask must hold only 0 and 1")
    labels = tensors.get("labels")
    if labels is None:  # a U-shaped upload: the labels stayed with the client
        return
    bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise WireError(f"{what}: labels must be -100 or token ids in [0, {vocab_size}); "
                        f"found {labels[bad][0].item()}")


def loss_meta(meta: Mapping[str, str], what: str) -> tuple[float, int]:
    """The loss and target tokens a blob's metadata carries beside a gradient."""
    try:
        return float(meta["loss"]), int(meta["tokens"])
    except (KeyError, ValueError):
        raise WireError(f"{what}: metadata lacks a numeric loss and tokens") from None
