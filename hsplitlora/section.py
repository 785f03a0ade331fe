"""The base of every config section: unknown keys are refused (a typo is an error, not a
silently ignored setting) and assignments are validated like loading is."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Section"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
