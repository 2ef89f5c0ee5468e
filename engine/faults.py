"""Fault injection for the crash tests: fail this process at a named point.

Off unless $TISTUDIO_FAULTS is set, e.g. `checkpoint.mid_write@20,step@35:oom`.
Each entry is POINT@STEP with an optional :ACTION —
  kill    (default) SIGKILL ourselves: the same as `kill -9`, at an exact instant
  oom     raise torch.OutOfMemoryError, as a GPU out of memory would
  enospc  raise OSError(ENOSPC), as a full disk would
  nan     return "nan": the caller poisons its loss
Each fault fires once: a marker in $TISTUDIO_FAULTS_STATE (required) remembers
it, so the resumed run passes the same point.  Only a process that called
`arm()` (the engine's worker) fires: the server and clients pass the same points
(run.json writes) and must not die there.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

_armed = False


def arm() -> None:
    global _armed
    _armed = True


def maybe_fault(point: str, step: int = 0) -> str | None:
    spec = os.environ.get("TISTUDIO_FAULTS")
    if not spec or not _armed:
        return None
    for entry in (s.strip() for s in spec.split(",")):
        where, _, action = entry.partition(":")
        if where == f"{point}@{step}" and _first_time(entry):
            return _fire(action or "kill", point)
    return None


def _first_time(entry: str) -> bool:
    """Claim the fault's marker; only one process ever does (several workers may reach the
    same point at once: O_EXCL makes the claim atomic)."""
    state = Path(os.environ["TISTUDIO_FAULTS_STATE"])
    state.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(state / entry.replace(":", "_"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as marker:
        marker.write(str(os.getpid()))
    return True


def _fire(action: str, point: str) -> str | None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {point})")
    if action == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    return action

