"""Every config field as a person reads it: dotted name, type, default, description.

The text is the pydantic schema's own (each field's ``description``), so ``hsplitlora
config``, the validation messages and the JSON schema never disagree.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from hsplitlora.errors import UserError

__all__ = ["describe_fields", "iter_fields"]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _submodel(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation,
                                                                     BaseModel) else None


def _models_inside(annotation: Any) -> list[type[BaseModel]]:
    """Models a field holds inside a list, dict or union (e.g. explicit device profiles)."""
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        sub = _submodel(arg)
        found += [sub] if sub is not None else _models_inside(arg)
    return found


def iter_fields(model: type[BaseModel], prefix: str = "") -> typing.Iterator[
        tuple[str, str, Any, str]]:
    """``(dotted name, type, default, description)`` of every leaf field, in order."""
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is not None:
            yield f"{prefix}{name}", "section", None, field.description or sub.__doc__ or ""
            yield from iter_fields(sub, f"{prefix}{name}.")
            continue
        if field.default_factory is not None:
            default = field.default_factory()  # type: ignore[call-arg]
        else:
            default = None if field.default is PydanticUndefined else field.default
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        yield f"{prefix}{name}", _type_name(field.annotation), default, field.description or ""
        for inner in dict.fromkeys(_models_inside(field.annotation)):
            yield from iter_fields(inner, f"{prefix}{name}[].")


def describe_fields(model: type[BaseModel], section: str | None = None) -> str:
    """The fields (of one ``section``, or all) as text: one entry per field."""
    if section is not None and section not in model.model_fields:
        raise UserError(f"no config section {section!r}; sections: "
                        f"{', '.join(model.model_fields)}")
    lines = []
    for name, type_, default, description in iter_fields(model):
        if section is not None and not (name == section or name.startswith(section + ".")):
            continue
        if section is not None and name == section:
            continue
        shown = default if not hasattr(default, "__fspath__") else str(default)
        lines.append(f"{name}: section" if type_ == "section" else f"{name}: {type_} = {shown!r}")
        if description:
            lines.append(f"    {' '.join(description.split())}")
    return "\n".join(lines)
