"""Error types shared by the engine, the CLI and the studio, and `one_line`: an error as people read it.

`UserError` is a mistake the user can fix (bad name, missing file, wrong
width): the CLI prints its message as one line and exits 2.  Anything else
is an internal failure (exit 1).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input. The message names the problem and the fix."""


class NotSupportedError(UserError):
    """A valid request for something this version does not support yet."""


class JobCancelled(Exception):
    """Raised inside a job when its cancel flag is seen."""


class EngineError(Exception):
    """The engine process failed us: it could not start, went away, or reported an internal error."""


def disk_full_message(exc: BaseException) -> str | None:
    """One line for a full disk (or quota), naming where and what to free; None for other errors."""
    import errno

    if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
    return (f"the disk is full{where}; free space there (old runs: `tistudio concept rm`, or "
            f"fewer checkpoints with --keep-checkpoints), then try again")


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
