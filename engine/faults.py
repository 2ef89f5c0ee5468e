"""Fault injection for the crash tests: kill this process at a named point.

Off unless $TISTUDIO_FAULTS is set, e.g. `checkpoint.mid_write@20,step@35`:
when the named point is reached at that step, the process SIGKILLs itself —
the same as `kill -9` from outside, but at an exact instant (say, halfway
through writing a checkpoint).  Each fault fires once: a marker file in
$TISTUDIO_FAULTS_STATE (required) remembers it, so the resumed run passes.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def maybe_crash(point: str, step: int) -> None:
    spec = os.environ.get("TISTUDIO_FAULTS")
    if not spec:
        return
    wanted = f"{point}@{step}"
    if wanted not in (s.strip() for s in spec.split(",")):
        return
    state = Path(os.environ["TISTUDIO_FAULTS_STATE"])
    marker = state / wanted
    if marker.exists():
        return
    state.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)
