"""The scheduler: runs the queue's jobs on the worker, one at a time, and settles each exactly once.

    JobQueue ──pop──▶ Scheduler ──start_job──▶ WorkerSupervisor ──▶ worker process
                         ▲   └─publish/end──▶ Subscriptions ──▶ clients
                         └── on_message / on_exit

A job is settled (`finish`) when its worker says it finished, when its worker
dies, when it is cancelled before it ran, or when the engine stops.  Settling
happens in memory first (the job is forgotten, its subscribers' streams end,
the loop moves on to the next job), then the final status goes to the ledger
to be written, unless the worker already wrote it.  A disk that refuses the
write (a full disk refuses every one) therefore never wedges the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from engine import jobs, protocol
from engine.fanout import Subscriptions
from engine.job_queue import Job, JobQueue
from engine.jobs import ACTIVE, FINAL
from engine.ledger import StatusLedger
from engine.supervisor import WorkerProcess, WorkerStartError, WorkerSupervisor, describe_exit

DEFAULT_CANCEL_GRACE = 15.0  # seconds a handler has to notice a cancel before its worker is killed

log = logging.getLogger("tistudio.engine")


class Scheduler:
    def __init__(self, home: Path, queue: JobQueue, subscriptions: Subscriptions, ledger: StatusLedger,
                 cancel_grace: float = DEFAULT_CANCEL_GRACE, device: str = "auto"):
        self.home = Path(home)
        self.queue = queue
        self.subscriptions = subscriptions
        self.ledger = ledger
        self.cancel_grace = cancel_grace
        self.supervisor = WorkerSupervisor(home, device, on_message=self._on_worker_message,
                                           on_exit=self._on_worker_exit)
        self.current: Job | None = None  # the job its worker is running
        self.stopping = False
        self.stop_reason = ""
        self._background: set[asyncio.Task] = set()  # held so the loop does not drop them

    def busy(self) -> int:
        """Jobs queued or running."""
        return len(self.queue) + (1 if self.current else 0)

    # -- the loop

    async def run(self) -> None:
        """Take jobs from the queue for ever, one at a time."""
        while True:
            job = self.current = await self.queue.pop()
            try:
                await self._run(job)
            except Exception:  # a bug here must not stall the queue behind this job
                log.exception("run %s: engine error", job.run_id)
                with contextlib.suppress(Exception):
                    self.finish(job, "interrupted", error="engine error (see engine.log); resume this run", write=True)
            finally:
                self.current = None

    async def _run(self, job: Job) -> None:
        job.done = asyncio.get_running_loop().create_future()
        try:
            worker = await self.supervisor.ensure()
        except WorkerStartError as exc:
            self.finish(job, "interrupted", error=f"the worker did not start ({exc}); resume this run", write=True)
            return
        if job.finished or self.stopping:  # the engine stopped while the worker was starting
            return
        if job.cancel_requested:  # cancelled while the worker was starting
            self.finish(job, "cancelled", write=True)
            return
        job.worker, job.pid, job.status = worker, worker.pid, "running"
        await self.supervisor.start_job(job.spec())
        await job.done

    # -- settling

    def finish(self, job: Job, status: str, error: str | None = None, write: bool = False) -> None:
        """Settle a job: forget it, (write its final status,) end its subscribers' streams.
        Never raises: the write is the ledger's, which remembers what the disk refuses."""
        if job.finished:
            return
        job.finished, job.status, job.pid = True, status, None
        self.queue.settled(job)
        if job.done and not job.done.done():
            job.done.set_result(status)
        if write:
            self._publish(job.run_id, self.ledger.settle(job.run_dir, status, error))
        for member_id, event in self.ledger.settle_members(job.run_dir, status, error):
            self._publish(member_id, event)
            self._end(member_id, status, error)
        self._end(job.run_id, status, error)
        log.info("run %s %s%s", job.run_id, status, f": {error}" if error else "")

    def _publish(self, run_id: str, event: dict | None) -> None:
        if event is not None:
            self.subscriptions.publish(run_id, event)

    def _end(self, run_id: str, status: str, error: str | None) -> None:
        unsaved = self.ledger.unsaved.get(run_id)
        self.subscriptions.end(run_id, status, error, unsaved.reason if unsaved else None)

    # -- what the worker says

    def _on_worker_message(self, worker: WorkerProcess, msg: protocol.Message) -> None:
        job = self.queue.get(getattr(msg, "run_id", None))
        if isinstance(msg, protocol.Event):
            event = msg.event
            if job and event.get("type") == "status" and event.get("status") in ACTIVE:
                job.status = event["status"]
            if job and isinstance(event.get("step"), int):
                job.step = event["step"]
            self.subscriptions.publish(msg.run_id, event)
        elif isinstance(msg, protocol.Progress) and job:
            job.step = msg.step if msg.step is not None else job.step
            job.steps = msg.steps if msg.steps is not None else job.steps
            job.fields.update(msg.fields)
        elif isinstance(msg, protocol.Finished) and job:
            # A worker whose own status write the disk refused leaves it to us (and the ledger).
            self.finish(job, msg.status, error=msg.error, write=msg.unsaved is not None)

    def _on_worker_exit(self, worker: WorkerProcess, code: int | None, run_id: str | None) -> None:
        job = self.current
        if job is None or job.worker is not worker or job.finished:
            return
        # The log may already hold the job's final status (it died right after writing it).
        try:
            logged = jobs.last_status_event(job.run_dir) or {}
        except OSError:
            logged = {}
        if logged.get("status") in FINAL:
            self.finish(job, logged["status"], error=logged.get("error"), write=True)  # run.json catches up
        elif job.cancel_requested:
            self.finish(job, "cancelled", error="killed: it did not stop in time after the cancel", write=True)
        else:
            if self.stopping:
                why = f"the engine stopped ({self.stop_reason})"
            else:
                why = f"the worker died ({describe_exit(code)})"
            self.finish(job, "interrupted", error=f"{why}; resume this run", write=True)

    # -- cancelling and stopping

    async def cancel(self, job: Job) -> str:
        """Cancel a queued job at once ("cancelled") or ask a running one to stop ("cancelling");
        one that ignores the request is killed after the grace period."""
        if self.queue.remove(job):
            self.finish(job, "cancelled", write=True)
            return "cancelled"
        job.cancel_requested = True
        if job.worker:
            await self.supervisor.cancel(job.run_id)
            task = asyncio.create_task(self._enforce_cancel(job))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return "cancelling"

    async def _enforce_cancel(self, job: Job) -> None:
        # A handler stuck in a long call (a model load) never reaches check_cancel.
        await asyncio.sleep(self.cancel_grace)
        if not job.finished and job.worker:
            log.warning("run %s ignored its cancel for %ss; killing worker %d",
                        job.run_id, self.cancel_grace, job.worker.pid)
            job.worker.kill()

    async def shutdown(self, reason: str) -> None:
        """The engine is stopping: queued jobs and the running one end interrupted, the worker exits."""
        self.stopping, self.stop_reason = True, reason
        why = f"the engine stopped ({reason})"
        for job in self.queue.drain():
            self.finish(job, "interrupted", error=f"{why} before this job ran; resume it", write=True)
        await self.supervisor.stop()  # its exit marks the running job interrupted
        if self.current and not self.current.finished:
            self.finish(self.current, "interrupted", error=f"{why}; resume it", write=True)
