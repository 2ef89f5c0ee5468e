"""A run's history as it counts: the events of its attempts, without what a killed attempt
logged past the checkpoint the next attempt resumed from.

Every attempt of a training run begins with its header event (`train`, at the step it starts
from).  A resumed attempt starts at its checkpoint's step, so whatever an earlier attempt logged
after that step never happened as far as the run is concerned: it is dropped here.  The
stopping rules and the best step (engine.inversion.monitor) are computed from this history,
so a run resumed after kill -9 decides exactly as one never interrupted; the Metrics screen
reads its probes from it too.  No torch.
"""

from __future__ import annotations

from pathlib import Path

from engine.store.events import EventLog, events_path


def counted(events: list[dict], upto: int | None = None) -> list[dict]:
    """The events that count, in log order; with `upto`, only those at a step <= `upto`
    (events without a step, such as status changes, are kept)."""
    kept: list[dict] = []
    for event in events:
        step = _step(event)
        if event.get("type") == "train" and step is not None:
            kept = [e for e in kept if (_step(e) is None or _step(e) <= step)]  # a new attempt from `step`
        kept.append(event)
    if upto is not None:
        kept = [e for e in kept if _step(e) is None or _step(e) <= upto]
    return kept


def run_history(run_dir: Path, upto: int | None = None) -> list[dict]:
    """`counted` over a run directory's events.jsonl (empty when it has none)."""
    return counted(EventLog(events_path(run_dir)).read(), upto)


def probes(run_dir: Path) -> list[dict]:
    """The run's probes (events of type `probe`), the SD row's first, then by step."""
    found = [e for e in run_history(run_dir) if e.get("type") == "probe"]
    return sorted(found, key=lambda e: (e.get("row") != "SD", _step(e) or 0))


def _step(event: dict) -> int | None:
    step = event.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None
