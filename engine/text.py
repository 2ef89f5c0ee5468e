"""Text for people: the one formatter that turns any message into a single line."""

from __future__ import annotations


def one_line(text: object, limit: int = 500) -> str:
    """`text` (an exception, a message) as one line of at most `limit` characters."""
    if isinstance(text, BaseException):
        line = " ".join(str(text).split()) or type(text).__name__
    else:
        line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
