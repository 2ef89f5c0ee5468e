"""What a job handler sees: `JobContext`, its run's log, progress and cancel flag (built by the worker)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.errors import JobCancelled
from engine.store.events import EventLog, events_path
from engine.store.runs import RESERVED_FIELDS, update_run
from engine.wire import protocol


@dataclass
class JobContext:
    """Everything a job handler may use.  Built by the worker; usable alone in tests:

        ctx = JobContext(spec, run_id, run_dir, home)   # emits to events.jsonl only
    """

    spec: dict
    run_id: str
    run_dir: Path
    home: Path
    cache: dict = field(default_factory=dict)  # lives as long as the worker: warm models
    resumed: bool = False
    send: Callable[[protocol.Message], None] | None = None  # forwards to the engine server
    is_cancelled: Callable[[], bool] | None = None
    log: EventLog | None = None
    progress_interval: float = 0.25  # seconds between progress messages to the server
    write_interval: float = 2.0  # seconds between step-only rewrites of run.json
    placement: dict = field(default_factory=dict)  # run.json fields saying where it runs: device, node
    # False for a helper group of a sweep split over workers (engine.wire.protocol.SweepGroup): the job's
    # own log and run.json belong to its lead group's worker, so what this context would write
    # there is dropped (one writer per file); its members' records are its own.
    writes_job: bool = True

    def __post_init__(self):
        self.run_dir, self.home = Path(self.run_dir), Path(self.home)
        self.log = self.log or EventLog(events_path(self.run_dir))
        self._step: int | None = None
        self._steps: int | None = None
        self._sent_at = 0.0
        self._written_at = 0.0
        self._dirty = False
        # Held across append+send so that events reach the server in seq order even when
        # a handler emits from several threads (subscribers drop any seq they have passed).
        self.emit_lock = threading.Lock()

    @property
    def params(self) -> dict:
        return self.spec.get("params") or {}

    def emit(self, type: str, **fields: Any) -> dict:
        """Append an event to the run's log and forward it to live subscribers."""
        if not self.writes_job:
            return {"type": type, **fields}
        with self.emit_lock:
            record = self.log.append({"type": type, **fields})
            if self.send:
                self.send(protocol.Event(self.run_id, record))
        return record

    def set_progress(self, step: int | None = None, steps: int | None = None, **run_fields: Any) -> None:
        """Update step/steps (throttled) and other run.json fields (written at once),
        e.g. `set_progress(embedding=str(path))` or `set_progress(model=identity)`."""
        bad = RESERVED_FIELDS.intersection(run_fields)
        if bad:
            raise ValueError(f"set_progress cannot set {sorted(bad)}")
        if not self.writes_job:
            return
        changed_steps = steps is not None and steps != self._steps
        if step is not None:
            self._step = step
        if steps is not None:
            self._steps = steps
        self._dirty = True
        now = time.monotonic()
        urgent = bool(run_fields) or changed_steps
        if self.send and (urgent or now - self._sent_at >= self.progress_interval):
            self._sent_at = now
            self.send(protocol.Progress(self.run_id, self._step, self._steps, run_fields))
        if urgent or now - self._written_at >= self.write_interval:
            self._written_at = now
            self._dirty = False
            update_run(self.run_dir, **self._progress(), **run_fields)

    def flush(self) -> None:
        """Write the latest step to run.json (the worker calls this when the job ends)."""
        if self._dirty and self.writes_job:
            self._dirty = False
            update_run(self.run_dir, **self._progress())
            if self.send:
                self.send(protocol.Progress(self.run_id, self._step, self._steps))

    def cancelled(self) -> bool:
        return bool(self.is_cancelled and self.is_cancelled())

    def check_cancel(self) -> None:
        """Raise JobCancelled if the user asked to cancel; call it between steps."""
        if self.cancelled():
            raise JobCancelled(self.run_id)

    def _progress(self) -> dict:
        out = {}
        if self._step is not None:
            out["step"] = self._step
        if self._steps is not None:
            out["steps"] = self._steps
        return out
