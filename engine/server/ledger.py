"""The engine's word on how each run ended: held in memory, written to disk when the disk allows.

run.json and events.jsonl stay each run's record, and the server writes them
when it settles a job whose worker did not (cancelled before it ran, a worker
that died, the engine stopping, a worker whose own write the disk refused).
A full disk refuses every write, the status update included.  So the server
settles a job in memory first and hands the write to the ledger, which never
raises: what the disk refuses, it remembers (`unsaved`), lays over what the
disk says when a client asks (`overlay`), reports (`health`), and writes again
on the server's next tick (`retry`) until the disk takes it.  Nothing here
runs a job or talks to a client.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.store import runs as jobs
from engine.store.paths import disk_full_message, is_disk_full
from engine.store.runs import FINAL

log = logging.getLogger("tistudio.engine")


@dataclass
class Unsaved:
    """A final status the disk has not taken yet."""

    run_dir: Path
    status: str
    error: str | None
    reason: str  # why the write failed, for the user
    result: dict | None = None


class StatusLedger:
    def __init__(self, home: os.PathLike | str):
        self.home = Path(home)
        self.unsaved: dict[str, Unsaved] = {}  # run id -> what the disk still lacks
        self._other: dict[str, Callable[[], None]] = {}  # other refused writes: what -> write it again
        self.failure: str | None = None  # the last write the disk refused, until writes work again
        self.failed_at: float | None = None

    # -- writing

    def settle(self, run_dir: os.PathLike | str, status: str, error: str | None = None,
               result: dict | None = None) -> dict | None:
        """Write a run's final status (engine.store.runs.settle_run); returns the status event written,
        if one was.  A refused write is remembered and tried again by `retry`."""
        run_dir = Path(run_dir)
        try:
            event = jobs.settle_run(run_dir, status, error, result)
        except (OSError, ValueError) as exc:
            self._refused(Unsaved(run_dir, status, error, self._why(exc), result), exc)
            return None
        self._written(run_dir.name)
        return event

    def recover(self, run_dir: os.PathLike | str, reason: str) -> str:
        """Startup recovery of a run a dead engine left active (engine.store.runs.recover_run);
        remembered as interrupted when the disk refuses."""
        run_dir = Path(run_dir)
        try:
            status = jobs.recover_run(run_dir, reason)
        except (OSError, ValueError) as exc:
            self._refused(Unsaved(run_dir, "interrupted", reason, self._why(exc)), exc)
            return "interrupted"
        self._written(run_dir.name)
        return status

    def settle_members(self, run_dir: os.PathLike | str, status: str, error: str | None = None,
                       only: list[str] | None = None) -> list[tuple[str, dict | None]]:
        """A sweep's members end with it: each member not yet final takes the parent's final
        status (`only`: just these members, a group whose worker died).  Returns (member id,
        status event written or None) for each one settled."""
        settled = []
        for member_id in jobs.member_ids(run_dir) if only is None else only:
            member_dir = Path(run_dir).parent / member_id
            try:
                current = jobs.load_run(member_dir).get("status")
            except (OSError, ValueError):
                continue  # not a run we can read: nothing to settle
            if current in FINAL or member_id in self.unsaved:
                continue
            settled.append((member_id, self.settle(member_dir, status, error)))
        return settled

    def write(self, what: str, write: Callable[[], None]) -> bool:
        """Do a write the ledger does not own (the pid file …); if the disk refuses, say so in
        `health` and try it again with the rest.  True if it was written."""
        try:
            write()
        except OSError as exc:
            self._other[what] = write
            self._refused(None, exc, what)
            return False
        self._other.pop(what, None)
        self._written(None)
        return True

    def retry(self) -> None:
        """Write again what the disk refused before (the server calls this on its tick)."""
        for what, write in list(self._other.items()):
            if not self.write(what, write):
                return
        for run_id, entry in list(self.unsaved.items()):
            if self.unsaved.get(run_id) is not entry:
                continue  # settled again or forgotten meanwhile
            try:
                jobs.settle_run(entry.run_dir, entry.status, entry.error, entry.result)
            except (OSError, ValueError) as exc:
                entry.reason = self._why(exc)
                return  # the disk is still refusing: try the rest next time
            log.info("run %s: its status %s is saved now", run_id, entry.status)
            self._written(run_id)

    def forget(self, run_id: str) -> None:
        """The run starts again (a resume): what it ended as before no longer matters."""
        self._written(run_id)

    # -- reading

    def overlay(self, run: dict) -> dict:
        """`run` (a run.json record) with the status the engine knows, if the disk lacks it."""
        entry = self.unsaved.get(run.get("id"))
        if entry:
            run.update(status=entry.status, error=entry.error, pid=None, unsaved=entry.reason)
        return run

    def health(self) -> dict:
        """{"writable", "error", "since", "unsaved": [run ids]}: whether the engine can write
        to its home, and if not, why and since when (epoch seconds)."""
        return {"writable": self.failure is None, "error": self.failure, "since": self.failed_at,
                "unsaved": sorted(self.unsaved)}

    # -- bookkeeping

    def _refused(self, entry: Unsaved | None, exc: BaseException, what: str | None = None) -> None:
        if entry is not None:
            self.unsaved[entry.run_dir.name] = entry
            what = f"the status of run {entry.run_dir.name} ({entry.status})"
        reason = self._why(exc)
        if self.failure is None:
            self.failed_at = time.time()
        self.failure = reason
        log.error("could not write %s: %s; kept in memory, will retry", what, reason)

    def _written(self, run_id: str | None) -> None:
        self.unsaved.pop(run_id, None)
        if not self.unsaved and not self._other:
            self.failure = self.failed_at = None

    def _why(self, exc: BaseException) -> str:
        if is_disk_full(exc):
            return disk_full_message(self.home, "the engine writes what it holds in memory by itself")
        return f"{type(exc).__name__}: {exc}"
