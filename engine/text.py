"""Text for people: the one-line form of an error, shared by the engine, the CLI and the studio.

Imports nothing from the engine, torch or Textual, so any layer may use it.
"""

from __future__ import annotations


def one_line(value: BaseException | str, limit: int = 400) -> str:
    """`value` (an exception or a message) on one line of at most `limit` characters.

    Runs of whitespace, newlines included, become one space, so a multi-line message
    fits a notification, a status field or a terminal line; a longer one is cut and
    ends with "…".  An exception with no message reads as its class name."""
    text = " ".join(str(value).split())
    if not text and isinstance(value, BaseException):
        text = type(value).__name__
    if len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    return text
