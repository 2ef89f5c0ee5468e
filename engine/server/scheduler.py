"""The scheduler: runs the queue's jobs on the workers, one job per worker at a time, and settles
each job exactly once.

    JobQueue ──take──▶ Scheduler ──start_job──▶ slot 0: supervisor (cuda:0) ──▶ worker
                        │   ▲                   slot 1: supervisor (cuda:1) ──▶ worker
                        │   └── on_message / on_exit, per slot
                        └──publish/end──▶ Subscriptions ──▶ clients

The workers come from a pool (engine.server.supervisor.LocalWorkers: one child process per
device; engine.server.ray_workers.RayWorkers: one Ray actor per GPU of a cluster), each behind a
supervisor with the same few methods, so nothing here knows which.  Which job a free
worker takes, and how a sweep is split over several, is engine.server.placement's decision.

A job runs as one task on one worker, or (a sweep split over workers) as one task per
group of its members.  A task ends when its worker says it finished, when its worker
dies, when its job is cancelled before it ran, or when the engine stops.  A job is
settled (`finish`) when its last task has ended: a whole job with that task's status, a
split sweep with the worst of its groups' (failed, then interrupted, then cancelled),
written by the server since no single worker saw it all.  Settling happens in memory
first (the job is forgotten, its subscribers' streams end, the workers take the next
jobs), then the final status goes to the ledger to be written, unless the worker
already wrote it.  A disk that refuses the write (a full disk refuses every one)
therefore never wedges the queue.  A worker that dies takes only its own task down:
the other workers go on, and the next job on that device gets a fresh worker.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from engine.server import placement, zygote
from engine.server.fanout import Subscriptions
from engine.server.ledger import StatusLedger
from engine.server.queue import Job, JobQueue, Task
from engine.server.supervisor import LocalWorkers, WorkerStartError, describe_exit
from engine.store import runs as jobs
from engine.store.runs import ACTIVE, FINAL
from engine.wire import protocol

DEFAULT_CANCEL_GRACE = 15.0  # seconds a handler has to notice a cancel before its worker is killed
DEVICE_NOTES = ("torch", "gpus", "note", "error")  # what a device probe may add, passed on as it is
WORST_FIRST = ("failed", "interrupted", "cancelled", "done")  # how a split sweep's groups combine

log = logging.getLogger("tistudio.engine")


class Slot:
    """One worker's place: its supervisor, and the task it runs."""

    def __init__(self, index: int, supervisor):
        self.index = index
        self.supervisor = supervisor
        self.task: Task | None = None
        self.last_step: dict | None = None  # the latest step event of its task: steps/s, VRAM

    @property
    def device(self) -> str:
        return self.supervisor.device

    def free(self) -> bool:
        return self.task is None


class Scheduler:
    def __init__(self, home: Path, queue: JobQueue, subscriptions: Subscriptions, ledger: StatusLedger,
                 cancel_grace: float = DEFAULT_CANCEL_GRACE, pool=None, smallest_group: int = 1):
        self.home = Path(home)
        self.queue = queue
        self.subscriptions = subscriptions
        self.ledger = ledger
        self.cancel_grace = cancel_grace
        self.pool = pool if pool is not None else LocalWorkers(home)
        self.smallest_group = smallest_group
        self.slots: list[Slot] = []
        self.stopping = False
        self.stop_reason = ""
        self._running: dict[Job, None] = {}  # started and not settled, in the order they started
        self._background: set[asyncio.Task] = set()  # held so the loop does not drop them

    async def start(self) -> None:
        """Bring up the pool (a Ray cluster is joined and checked here) and make a slot per worker."""
        await self.pool.start()
        supervisors = self.pool.supervisors(self._on_worker_message, self._on_worker_exit)
        self.slots = [Slot(i, supervisor) for i, supervisor in enumerate(supervisors)]

    def busy(self) -> int:
        """Jobs queued or running."""
        return len(self.queue.active)

    def running(self) -> list[Job]:
        """Jobs started on workers and not yet settled, in the order they started."""
        return list(self._running)

    def check_device(self, requested: str | None) -> None:
        """UserError when no worker of this engine could take a job asking for `requested`."""
        self.pool.check_device(requested)

    # -- the loop

    async def run(self) -> None:
        """Hand waiting jobs to free workers for ever."""
        while True:
            try:
                self._dispatch()
            except Exception:  # a bug here must not stop the engine taking jobs
                log.exception("dispatch failed")
            await self.queue.changed()

    def _dispatch(self) -> None:
        if self.stopping:
            return
        for job in self.queue.waiting():
            free = [slot for slot in self.slots if slot.free() and slot.supervisor.fits(job.device)]
            if free:
                self.queue.remove(job)
                self._start(job, free)

    def _start(self, job: Job, free: list[Slot]) -> None:
        job.done = asyncio.get_running_loop().create_future()
        self._running[job] = None
        try:
            plan = placement.plan(job.kind, job.params, job.run_dir, len(free), self.smallest_group)
        except (OSError, ValueError) as exc:  # an unreadable record: run it whole, the worker will say
            log.warning("run %s: could not plan a split (%s); running it whole", job.run_id, exc)
            plan = placement.Plan()
        job.groups = len(plan.groups)
        for slot, group in zip(free, plan.groups):
            self._launch(slot, Task(job, group, members=group.members if group else None))
        if job.split:
            log.info("run %s: split over %d workers", job.run_id, job.groups)

    def _launch(self, slot: Slot, task: Task) -> None:
        task.device = slot.device
        task.done = asyncio.get_running_loop().create_future()
        slot.task, slot.last_step = task, None
        task.job.tasks.append(task)
        self._in_background(self._run_task(slot, task))

    async def _run_task(self, slot: Slot, task: Task) -> None:
        job = task.job
        try:
            try:
                worker = await slot.supervisor.ensure(warm=zygote.wants_warm(job.kind))
            except WorkerStartError as exc:
                self._task_ended(slot, task, "interrupted", f"the worker did not start ({exc}); resume this run")
                return
            if task.ended or job.finished or self.stopping:  # the engine stopped while the worker was starting
                return
            if job.cancel_requested:  # cancelled while the worker was starting
                self._task_ended(slot, task, "cancelled")
                return
            task.worker = worker
            if task.lead:
                job.worker, job.pid, job.status = worker, worker.pid, "running"
            await slot.supervisor.start_job(job.spec(task.group))
            await task.done
        except Exception:  # a bug here must not stall the queue behind this job
            log.exception("run %s: engine error", job.run_id)
            self._task_ended(slot, task, "interrupted", "engine error (see engine.log); resume this run")

    # -- settling

    def _task_ended(self, slot: Slot, task: Task, status: str, error: str | None = None,
                    write: bool = True) -> None:
        """A task is over: free its worker, and settle its job once every task of it has ended.
        `write`: the worker did not write the job's final status (always so for a split sweep)."""
        if task.ended:
            return
        task.ended, task.status, task.error = True, status, error
        if slot.task is task:
            slot.task = None
        if task.done and not task.done.done():
            task.done.set_result(status)
        job = task.job
        if not job.split:
            self.finish(job, status, error, write=write)
        else:
            if status != "done" and task.members:  # its members stop with it; the other groups go on
                self._settle_members(job, status, error, only=task.members)
            if task.lead and status != "done" and task.group.members is None and not job.fields.get("members"):
                # A first attempt's lead ended before making the members: the others wait for them in vain.
                self._in_background(self._cancel_tasks(job))
            self._settle_split(job)
        self.queue.wake()

    def _settle_split(self, job: Job) -> None:
        if job.finished or not all(task.ended for task in job.tasks):
            return
        statuses = {task.status for task in job.tasks}
        status = next((s for s in WORST_FIRST if s in statuses), "interrupted")
        error = next((t.error for t in job.tasks if t.status == status and t.error), None)
        result = None
        if status == "done":
            from engine.store.sweeps import sweep_result

            try:
                result = sweep_result(job.run_dir)
            except (OSError, ValueError):
                result = None
        self.finish(job, status, error, write=True, result=result)

    def finish(self, job: Job, status: str, error: str | None = None, write: bool = False,
               result: dict | None = None) -> None:
        """Settle a job: forget it, (write its final status,) end its subscribers' streams.
        Never raises: the write is the ledger's, which remembers what the disk refuses."""
        if job.finished:
            return
        job.finished, job.status, job.pid = True, status, None
        self.queue.settled(job)
        self._running.pop(job, None)
        if job.done and not job.done.done():
            job.done.set_result(status)
        if write:
            self._publish(job.run_id, self.ledger.settle(job.run_dir, status, error, result))
        self._settle_members(job, status, error)
        self._end(job.run_id, status, error)
        log.info("run %s %s%s", job.run_id, status, f": {error}" if error else "")
        self.queue.wake()

    def _settle_members(self, job: Job, status: str, error: str | None, only: list[str] | None = None) -> None:
        for member_id, event in self.ledger.settle_members(job.run_dir, status, error, only=only):
            self._publish(member_id, event)
            self._end(member_id, status, error)

    def _publish(self, run_id: str, event: dict | None) -> None:
        if event is not None:
            self.subscriptions.publish(run_id, event)

    def _end(self, run_id: str, status: str, error: str | None) -> None:
        unsaved = self.ledger.unsaved.get(run_id)
        self.subscriptions.end(run_id, status, error, unsaved.reason if unsaved else None)

    def _members_made(self, job: Job, members: list[str]) -> None:
        """The lead of a split sweep has made the members: each task now knows its group's
        (engine.store.sweeps.chunk, as the workers split them)."""
        from engine.store.sweeps import chunk

        groups = chunk(list(members), job.groups)
        for task in job.tasks:
            if task.group is not None and task.members is None and task.group.index < len(groups):
                task.members = groups[task.group.index]

    # -- what the workers say

    def _on_worker_message(self, index: int, worker, msg: protocol.Message) -> None:
        slot = self.slots[index]
        job = self.queue.get(getattr(msg, "run_id", None))
        if isinstance(msg, protocol.Event):
            event = msg.event
            if job and event.get("type") == "status" and event.get("status") in ACTIVE:
                job.status = event["status"]
            if job and isinstance(event.get("step"), int):
                job.step = event["step"]
            if event.get("type") == "step" and slot.task is not None:
                slot.last_step = event
            self.subscriptions.publish(msg.run_id, event)
        elif isinstance(msg, protocol.Progress) and job:
            job.step = msg.step if msg.step is not None else job.step
            job.steps = msg.steps if msg.steps is not None else job.steps
            job.fields.update(msg.fields)
            if msg.fields.get("members") and job.split:
                self._members_made(job, msg.fields["members"])
        elif isinstance(msg, protocol.Finished):
            task = slot.task
            if task is not None and task.worker is worker and task.job.run_id == msg.run_id:
                # A worker whose own status write the disk refused leaves it to us (and the ledger).
                self._task_ended(slot, task, msg.status, msg.error, write=msg.unsaved is not None)

    def _on_worker_exit(self, index: int, worker, code: int | None, run_id: str | None) -> None:
        slot = self.slots[index]
        task = slot.task
        if task is None or task.worker is not worker or task.ended:
            return
        job = task.job
        logged = {}
        if not job.split:  # the log may already hold the job's final status (it died right after writing it)
            try:
                logged = jobs.last_status_event(job.run_dir) or {}
            except OSError:
                logged = {}
        if logged.get("status") in FINAL:
            self._task_ended(slot, task, logged["status"], logged.get("error"))  # run.json catches up
        elif job.cancel_requested:
            self._task_ended(slot, task, "cancelled", "killed: it did not stop in time after the cancel")
        else:
            if self.stopping:
                why = f"the engine stopped ({self.stop_reason})"
            else:
                why = f"the {slot.device} worker died ({getattr(worker, 'death', None) or describe_exit(code)})"
            self._task_ended(slot, task, "interrupted", f"{why}; resume this run")

    # -- cancelling and stopping

    async def cancel(self, job: Job) -> str:
        """Cancel a queued job at once ("cancelled") or ask a running one to stop ("cancelling");
        one that ignores the request is killed after the grace period."""
        if self.queue.remove(job):
            self.finish(job, "cancelled", write=True)
            return "cancelled"
        job.cancel_requested = True
        await self._cancel_tasks(job)
        return "cancelling"

    async def _cancel_tasks(self, job: Job) -> None:
        """Tell every worker running part of `job` to stop; kill those that do not in time."""
        job.cancel_requested = True
        for slot in self.slots:
            task = slot.task
            if task is not None and task.job is job and task.worker is not None and not task.ended:
                await slot.supervisor.cancel(job.run_id)
                self._in_background(self._enforce_cancel(slot, task))

    async def _enforce_cancel(self, slot: Slot, task: Task) -> None:
        # A handler stuck in a long call (a model load) never reaches check_cancel.
        await asyncio.sleep(self.cancel_grace)
        if not task.ended and task.worker is not None:
            log.warning("run %s ignored its cancel for %ss; killing worker %s on %s",
                        task.job.run_id, self.cancel_grace, task.worker.pid, slot.device)
            task.worker.kill()

    async def shutdown(self, reason: str) -> None:
        """The engine is stopping: queued jobs and the running ones end interrupted, the workers exit."""
        self.stopping, self.stop_reason = True, reason
        why = f"the engine stopped ({reason})"
        for job in self.queue.drain():
            self.finish(job, "interrupted", error=f"{why} before this job ran; resume it", write=True)
        # Their exits mark the running tasks interrupted.
        await asyncio.gather(*(slot.supervisor.stop() for slot in self.slots), return_exceptions=True)
        for job in self.running():
            self.finish(job, "interrupted", error=f"{why}; resume it", write=True)
        await self.pool.close()

    def _in_background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- what the workers are doing

    async def workers(self, probe: bool = True) -> list[dict]:
        """One dict per worker, as engine.wire.protocol.StatusAnswer documents `workers`; `probe`:
        ask each device now (never by starting a worker), else its last known figures."""
        gpus = await self.pool.gpus() if probe else None
        infos = await asyncio.gather(*(slot.supervisor.probe_device(gpus) if probe else _last(slot)
                                       for slot in self.slots))
        return [describe_worker(slot, info or {}) for slot, info in zip(self.slots, infos)]


async def _last(slot: Slot) -> dict:
    return slot.supervisor.last_device or {"device": slot.device}


def describe_worker(slot: Slot, info: dict) -> dict:
    """One worker as `engine status` shows it (engine.wire.protocol.StatusAnswer, `workers`): its device,
    state, job, latest step and memory, from its slot and what its device answered (`info`)."""
    supervisor, task = slot.supervisor, slot.task
    job = task.job if task else None
    if task is not None:
        state = "running" if task.worker is not None else "starting"
    else:
        state = "idle" if supervisor.pid else "none"
    step = slot.last_step if task is not None else None
    memory = {k: v for k, v in info.items() if k.startswith("vram_")}
    memory.update({k: v for k, v in (step or {}).items() if k.startswith("vram_") and v is not None})
    memory.update(supervisor.memory())
    return {
        "worker": slot.index, "device": info.get("device") or slot.device, "backend": supervisor.backend,
        "node": supervisor.node, "pid": supervisor.pid, "state": state,
        "job": job.run_id if job else None, "kind": job.kind if job else None,
        "concept": job.concept if job else None,
        "members": task.members if task is not None and task.group is not None else None,
        "step": (step or {}).get("step"), "steps": (step or {}).get("steps"),
        "steps_per_s": (step or {}).get("steps_per_s"), "name": info.get("name"), "memory": memory,
        "source": info.get("source"), **{k: info[k] for k in DEVICE_NOTES if info.get(k) is not None},
        **({"held": info["held"]} if info.get("held") else {}),  # an idle worker's warm model, compiled UNet
    }
