"""The engine's operations: one method per client request (engine.wire.protocol), each returning its answer.

`answer(request)` runs the one the request names and turns failures into an
ErrorAnswer (user=True for a mistake the user can fix).  `subscribe` streams
instead of answering once.  The connection handling around them is the
server's (engine.server.main); the work they start is the scheduler's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from engine.devices import probe as device_probe
from engine.errors import UserError
from engine.server.fanout import Subscriptions, follow, send, send_events
from engine.server.ledger import StatusLedger
from engine.server.queue import Job, JobQueue
from engine.server.scheduler import DEVICE_NOTES, Scheduler
from engine.settings.jobs import CHECKS, about_a_concept, check_job
from engine.store import runs as jobs
from engine.store.events import EventLog, events_path
from engine.store.library import Library
from engine.store.paths import disk_full_message, is_disk_full
from engine.wire import protocol

log = logging.getLogger("tistudio.engine")


class Operations:
    def __init__(self, home: Path, queue: JobQueue, scheduler: Scheduler, subscriptions: Subscriptions,
                 ledger: StatusLedger, *, version: str, idle_seconds: float, clients: Callable[[], int]):
        self.home = Path(home)
        self.queue = queue
        self.scheduler = scheduler
        self.subscriptions = subscriptions
        self.ledger = ledger
        self.version = version
        self.idle_seconds = idle_seconds
        self.started = time.time()
        self._clients = clients  # how many connections the server holds
        self._handlers = {
            protocol.Ping: self.ping, protocol.Status: self.status, protocol.Submit: self.submit,
            protocol.Cancel: self.cancel, protocol.Jobs: self.jobs, protocol.Stop: self.stop,
        }

    async def answer(self, request: protocol.Message) -> protocol.Message:
        """The answer to any request but Subscribe."""
        try:
            return await self._handlers[type(request)](request)
        except UserError as exc:
            return protocol.ErrorAnswer(str(exc), user=True)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            return protocol.ErrorAnswer(disk_full_message(self.home, "try again"))
        except Exception as exc:
            log.exception("op %s failed", request.NAME)
            return protocol.ErrorAnswer(f"{type(exc).__name__}: {exc}")

    async def ping(self, req: protocol.Ping) -> protocol.PingAnswer:
        return protocol.PingAnswer(pid=os.getpid(), version=self.version)

    async def status(self, req: protocol.Status) -> protocol.StatusAnswer:
        workers = await self.scheduler.workers(probe=req.device)
        running = self.scheduler.running()
        first = workers[0] if workers else {}
        device = {k: v for k, v in first.items() if k in ("device", "name", "source", *DEVICE_NOTES) and v is not None}
        device.update(first.get("memory") or {})
        return protocol.StatusAnswer(
            pid=os.getpid(),
            version=self.version,
            home=str(self.home),
            started=self.started,
            uptime=time.time() - self.started,
            queue=len(self.queue),
            queued=[job.run_id for job in self.queue.waiting()],
            running=running[0].summary() if running else None,
            worker_pid=first.get("pid"),
            device=device or {"device": "unknown"},
            clients=self._clients(),
            idle_seconds=self.idle_seconds,
            environment=device_probe.environment(os.environ),
            storage=self.ledger.health(),
            workers=workers,
            backend=self.scheduler.pool.describe(),
        )

    async def submit(self, req: protocol.Submit) -> protocol.SubmitAnswer:
        if self.scheduler.stopping:
            raise RuntimeError("the engine is stopping; submit again in a moment")
        if req.resume:
            job = self._resumed_job(req.resume, req.params)
        else:
            job = self._new_job(req)
        position = self.queue.push(job)
        return protocol.SubmitAnswer(job.run_id, str(job.run_dir), position)

    def _new_job(self, req: protocol.Submit) -> Job:
        spec = {"kind": req.kind, "concept": req.concept, "params": req.params or {}}
        self._check(req.kind, req.concept, spec["params"])  # the door: before anything is written
        run_dir = jobs.create_run(self.home, spec)
        try:
            EventLog(events_path(run_dir)).append({"type": "status", "status": "queued"})
        except OSError:
            shutil.rmtree(run_dir, ignore_errors=True)  # refused whole: no half-made run left behind
            raise
        return Job(run_dir.name, run_dir, spec["kind"], spec["concept"], spec["params"])

    def _resumed_job(self, run_id: str, params: dict | None) -> Job:
        active = self.queue.get(run_id)
        if active:
            raise UserError(f"run {run_id} is already {active.status}")
        run_dir = jobs.find_run(self.home, run_id)
        record = jobs.load_run(run_dir)
        merged = {**(record.get("params") or {}), **(params or {})}
        self._check(record["kind"], record.get("concept"), merged, resumed=True)
        self.ledger.retry()  # how it ended last time goes to disk first, if it is still in memory
        jobs.set_status(run_dir, "queued", resume=True, params=merged, finished=None, pid=None)
        self.ledger.forget(run_id)
        return Job(run_id, run_dir, record["kind"], record.get("concept"), merged,
                   step=record.get("step") or 0, steps=record.get("steps"),
                   attempts=record.get("attempts") or 0, resumed=True)

    def _check(self, kind: str, concept: str | None, params: dict, resumed: bool = False) -> None:
        """Every request's settings, checked with the code the CLI and the studio use
        (engine.settings.jobs), and its device against the workers there are."""
        about = about_a_concept(kind, concept)
        found = Library(self.home).get(concept) if about and kind in CHECKS else None
        check_job(kind, params, found, resumed=resumed)
        self.scheduler.check_device(_requested_device(params))

    async def cancel(self, req: protocol.Cancel) -> protocol.CancelAnswer:
        job = self.queue.get(req.run_id)
        if job is None:
            status = self._record(jobs.find_run(self.home, req.run_id))["status"]
            raise UserError(f"run {req.run_id} is already {status}")
        return protocol.CancelAnswer(await self.scheduler.cancel(job))

    async def jobs(self, req: protocol.Jobs) -> protocol.JobsAnswer:
        runs = await asyncio.to_thread(jobs.list_runs, self.home)
        positions = self.queue.positions()
        for run in runs:
            job = self.queue.get(run["id"])
            if job:
                run.update(job.summary())
            self.ledger.overlay(run)
            run["position"] = positions.get(run["id"])
        running = [job.run_id for job in self.scheduler.running()]
        return protocol.JobsAnswer(runs, [job.run_id for job in self.queue.waiting()],
                                   running[0] if running else None, storage=self.ledger.health(),
                                   running_jobs=running)

    async def stop(self, req: protocol.Stop) -> protocol.StopAnswer:
        busy = self.scheduler.busy()
        if busy and not req.force:
            raise UserError(f"the engine has {busy} job(s) queued or running; cancel them or stop with --force")
        return protocol.StopAnswer()

    async def subscribe(self, req: protocol.Subscribe, writer: asyncio.StreamWriter) -> None:
        """Replay the run's log after `after_seq`, then follow live events, dropping any seq
        already sent.  We listen before reading the file, so nothing falls between."""
        job = self.queue.get(req.run_id)
        try:
            run_dir = job.run_dir if job else jobs.find_run(self.home, req.run_id)
        except UserError as exc:
            await send(writer, protocol.ErrorAnswer(str(exc), user=True))
            return
        record = self._record(run_dir)
        if job is None:  # a member of a running sweep follows its parent's life
            job = self.queue.get(record.get("parent") or "")
        with self.subscriptions.listen(req.run_id) as queue:
            events = await asyncio.to_thread(EventLog(events_path(run_dir)).read, req.after_seq)
            last = req.after_seq
            if events:
                await send_events(writer, events)
                last = events[-1].get("seq", last)
            if job is None or not req.follow:
                end = (job.status,) if job else (record.get("status"), record.get("error"), record.get("unsaved"))
                await send(writer, protocol.StreamEnd(*end))
                return
            await follow(queue, writer, last)

    def _record(self, run_dir: Path) -> dict:
        """A run's record as the engine knows it: run.json, with what the disk lacks laid over it."""
        return self.ledger.overlay(jobs.load_run(run_dir))


def _requested_device(params: dict) -> str | None:
    device = params.get("device") if isinstance(params, dict) else None
    if device is not None and not isinstance(device, str):
        raise UserError(f"device {device!r} is not a device name; give cpu, cuda or cuda:N")
    return device or None
