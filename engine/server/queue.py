"""The engine's queue: jobs waiting for a worker, in arrival order, and every job not yet settled.

Pure bookkeeping, no processes and no disk: `engine.server.scheduler` takes jobs from
here and runs them; `engine.server.operations` puts them here and answers questions
about them.  run.json stays each run's record; a `Job` is what the server
knows about a queued or running run beyond it (its tasks and their workers, a
cancel request, the future its scheduler waits on).  A job runs as one `Task`
on one worker, or, a sweep split over several workers, as one task per group.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.wire.protocol import JobSpec, SweepGroup


@dataclass(eq=False)
class Job:
    """A queued or running run as the server sees it."""

    run_id: str
    run_dir: Path
    kind: str
    concept: str | None
    params: dict
    status: str = "queued"
    step: int = 0
    steps: int | None = None
    pid: int | None = None
    fields: dict = field(default_factory=dict)  # run.json fields a handler reported (embedding …)
    attempts: int = 0
    resumed: bool = False
    cancel_requested: bool = False
    finished: bool = False
    worker: Any = None  # the engine.server.supervisor.WorkerProcess running it (a split sweep: its lead's)
    done: asyncio.Future | None = None  # resolved with the final status when it is settled
    tasks: list[Task] = field(default_factory=list)  # its work on workers, one per group when split
    groups: int = 1  # how many groups it is split into (1: not split)

    @property
    def device(self) -> str | None:
        """The device it asks for (`--device`), or None for any worker."""
        return self.params.get("device") or None

    @property
    def split(self) -> bool:
        return self.groups > 1

    def summary(self) -> dict:
        """The live fields a client sees laid over run.json."""
        devices = [t.device for t in self.tasks if t.device and not t.ended]
        extra = {"device": devices[0] if len(devices) == 1 else devices} if devices else {}
        return {"id": self.run_id, "kind": self.kind, "concept": self.concept, "status": self.status,
                "step": self.step, "steps": self.steps, "pid": self.pid, **self.fields, **extra}

    def spec(self, group: SweepGroup | None = None) -> JobSpec:
        """What a worker needs to run it (or one group of it)."""
        return JobSpec(self.run_id, str(self.run_dir), self.kind, self.concept, self.params,
                       self.resumed, self.attempts, group)


@dataclass(eq=False)
class Task:
    """One job's work on one worker: the whole job (`group` None), or one group of a split sweep."""

    job: Job
    group: SweepGroup | None = None
    device: str | None = None  # the device of the worker it runs on
    worker: Any = None  # the engine.server.supervisor.WorkerProcess running it, once started
    members: list[str] | None = None  # the sweep members it trains, when known
    status: str | None = None  # how it ended
    error: str | None = None
    ended: bool = False
    done: asyncio.Future | None = None  # resolved when it ends

    @property
    def lead(self) -> bool:
        """It writes the job's own run.json and log."""
        return self.group is None or self.group.index == 0


class JobQueue:
    """FIFO of waiting jobs, plus an index of every job that is queued or running."""

    def __init__(self):
        self._waiting: collections.deque[Job] = collections.deque()
        self.active: dict[str, Job] = {}  # run id -> job, queued or running, until settled
        self._arrived = asyncio.Event()

    def push(self, job: Job) -> int:
        """Queue `job`; returns its position (1 = next)."""
        self.active[job.run_id] = job
        self._waiting.append(job)
        self._arrived.set()
        return len(self._waiting)

    async def pop(self) -> Job:
        """The oldest waiting job, waiting for one to arrive if need be."""
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        return self._waiting.popleft()

    async def changed(self) -> None:
        """Wait until a job arrives or `wake` is called (a worker came free)."""
        await self._arrived.wait()
        self._arrived.clear()

    def wake(self) -> None:
        """Tell whoever waits in `changed` to look again."""
        self._arrived.set()

    def remove(self, job: Job) -> bool:
        """Take a job out of the line (a cancel before it ran); False if it was not waiting."""
        try:
            self._waiting.remove(job)
        except ValueError:
            return False
        return True

    def drain(self) -> list[Job]:
        """Every waiting job, oldest first, leaving the line empty (the engine is stopping)."""
        waiting = list(self._waiting)
        self._waiting.clear()
        return waiting

    def settled(self, job: Job) -> None:
        """`job` reached a final status: forget it."""
        self.active.pop(job.run_id, None)

    def get(self, run_id: str | None) -> Job | None:
        return self.active.get(run_id) if run_id is not None else None

    def waiting(self) -> list[Job]:
        return list(self._waiting)

    def positions(self) -> dict[str, int]:
        """Run id -> place in line (1 = next) for every waiting job."""
        return {job.run_id: i for i, job in enumerate(self._waiting, start=1)}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, job: Job) -> bool:
        return job in self._waiting
