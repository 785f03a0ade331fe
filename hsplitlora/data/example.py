"""The one record type every loader returns, and the error every loader raises."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hsplitlora.errors import UserError

__all__ = ["DataError", "Example"]


class DataError(UserError, ValueError):
    """Input data is malformed; the message names the file, the line and the fix.

    A subclass of ValueError so callers that only know "bad value" still catch it.
    """


@dataclass(frozen=True)
class Example:
    """One training or evaluation pair: the model reads `prompt` and learns to write `target`.

    `target` carries its own leading space (E2E: ``" " + ref``) so that tokenising prompt and
    target separately gives the same word boundaries as tokenising their concatenation.
    `meta` holds strings only (the MR, its slots, a JSONL record's extra keys) so partitioners
    can group and label examples without knowing where they came from.
    `segments`, when given (chat data), is the whole training text as ``(text, trainable)``
    pieces: a conversation has several assistant turns to learn, which one prompt/target
    pair cannot hold; `prompt` and `target` then are the last turn's, for generation and
    as its reference.
    """

    prompt: str
    target: str
    meta: Mapping[str, str] = field(default_factory=dict)
    segments: tuple[tuple[str, bool], ...] = ()

    def __post_init__(self) -> None:
        # A private copy: a caller mutating the dict it passed in must not change the example.
        object.__setattr__(self, "meta", dict(self.meta))
