"""Error types shared by the engine, the CLI and the studio.

`UserError` is a mistake the user can fix (bad name, missing file, wrong
width): the CLI prints its message as one line and exits 2.  Anything else
is an internal failure (exit 1).
"""


class UserError(Exception):
    """A problem with the user's input. The message names the problem and the fix."""


class NotSupportedError(UserError):
    """A valid request for something this version does not support yet."""


class JobCancelled(Exception):
    """Raised inside a job when its cancel flag is seen."""


class EngineError(Exception):
    """The engine process failed us: it could not start, went away, or reported an internal error."""
