"""The mark of a person's mistake: every error a user can fix (config, data, model, split,
plan, run folder) derives from :class:`UserError`, so the CLI reports it as one message
and exit code 2, and anything else, a bug, keeps its traceback."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Raised for input a person can fix; the message says what was wrong and how."""
