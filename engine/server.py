"""The engine process: owns the job queue, one worker, and the socket clients talk to.

    python -m engine.server --home DIR [--idle SECONDS]

Started on demand by `engine.client` in its own session, so closing the terminal
never stops a run.  One engine per home (an flock on engine/engine.lock; a second
server exits quietly with status 0).  It imports no torch: GPU work happens in the
worker (`engine.worker`), a child process that lives across jobs to keep models
warm and is replaced if it dies.  The engine exits once nothing is queued or
running and no client has been connected for the idle period
(--idle, else $TISTUDIO_ENGINE_IDLE, else 30 minutes).

Files, in <home>/engine/ (0700):  engine.sock (0600), engine.lock, engine.pid, engine.log.

The wire protocol (socket paths, message shapes, encoding) is engine.protocol.

Startup recovery: runs left queued or running by an engine that died are marked
`interrupted` (with a status event).  They are not restarted automatically; the
user resumes them (`submit` with "resume"), because a GPU job nobody asked for
right now could collide with whatever the user is doing after a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from engine import jobs, protocol
from engine.errors import UserError
from engine.jobs import ACTIVE, FINAL, EventLog
from engine.paths import atomic_write_text, ensure_private_dir, home_dir
from engine.protocol import (
    EVENTS_PER_BATCH, STREAM_LIMIT, engine_dir, log_path, pid_path, socket_address, socket_path,
)

DEFAULT_IDLE = 30 * 60.0
DEFAULT_CANCEL_GRACE = 15.0  # seconds a handler has to notice a cancel before its worker is killed
WORKER_START_TIMEOUT = 60.0
DEVICE_TIMEOUT = 30.0  # the first device probe imports torch

log = logging.getLogger("tistudio.engine")


# ---------------------------------------------------------------------------
# In-memory state


@dataclass(eq=False)
class Job:
    """A queued or running run as the server sees it (run.json stays the record)."""

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
    worker: "WorkerProcess | None" = None
    done: asyncio.Future | None = None

    def summary(self) -> dict:
        return {"id": self.run_id, "kind": self.kind, "concept": self.concept, "status": self.status,
                "step": self.step, "steps": self.steps, "pid": self.pid, **self.fields}


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.pid = proc.pid
        self.reader: asyncio.Task | None = None

    async def send(self, msg: protocol.Message) -> None:
        # A dead worker is noticed by its reader (stdout EOF); a failed write changes nothing.
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.proc.stdin.write(protocol.encode(msg))
            await self.proc.stdin.drain()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class EngineStartError(Exception):
    pass


# ---------------------------------------------------------------------------
# The server


class EngineServer:
    def __init__(self, home: Path, idle_seconds: float = DEFAULT_IDLE, cancel_grace: float = DEFAULT_CANCEL_GRACE):
        self.home = Path(home)
        self.idle_seconds = idle_seconds
        self.cancel_grace = cancel_grace
        self.version = jobs.code_version()
        self.queue: collections.deque[Job] = collections.deque()
        self.active: dict[str, Job] = {}  # queued and running
        self.current: Job | None = None
        self.worker: WorkerProcess | None = None
        self.device: dict | None = None  # last device report from the worker
        self.subs: dict[str, set[asyncio.Queue]] = collections.defaultdict(set)
        self.clients = 0
        self.started = time.time()
        self._last_busy = time.monotonic()
        self._stopping = False
        self._stop_reason = ""
        self._writers: set[asyncio.StreamWriter] = set()
        self._background: set[asyncio.Task] = set()  # held so the loop does not drop them
        self._connections: set[asyncio.Task] = set()

    # -- lifecycle

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._stop = asyncio.Event()
        self._worker_lock = asyncio.Lock()
        self._device_future: asyncio.Future | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        await asyncio.to_thread(self._recover)
        sock = _bind_socket(socket_path(self.home))
        self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=STREAM_LIMIT)
        atomic_write_text(pid_path(self.home), f"{os.getpid()}\n")
        log.info("engine %s started (pid %d, idle exit after %ss)", self.version, os.getpid(), self.idle_seconds)
        tasks = [asyncio.create_task(self._scheduler()), asyncio.create_task(self._idle_watch())]
        await self._stop.wait()
        await self._teardown(tasks)
        log.info("engine stopped: %s", self._stop_reason)

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    async def _teardown(self, tasks: list[asyncio.Task]) -> None:
        self._stopping = True
        self._server.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path(self.home).unlink()
        why = f"the engine stopped ({self._stop_reason})"
        while self.queue:
            self._finish(self.queue.popleft(), "interrupted", error=f"{why} before this job ran; resume it", write=True)
        if self.worker:
            await self._stop_worker(self.worker)  # its reader marks the running job interrupted
        if self.current and not self.current.finished:
            self._finish(self.current, "interrupted", error=f"{why}; resume it", write=True)
        for task in tasks:
            task.cancel()
        await self._close_clients()
        with contextlib.suppress(FileNotFoundError):
            pid_path(self.home).unlink()

    async def _close_clients(self) -> None:
        # Subscribers were sent their end marker by _finish; give them a moment to flush it.
        deadline = time.monotonic() + 1.0
        while self.subs and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for writer in list(self._writers):
            writer.close()
        # Let each connection handler see its EOF and return, rather than be cancelled
        # by asyncio.run (which logs a traceback per connection on Python 3.11).
        if self._connections:
            await asyncio.wait(self._connections, timeout=1.0)

    def _recover(self) -> None:
        """Mark runs that a dead engine left queued or running as interrupted."""
        for run in jobs.list_runs(self.home):
            if run.get("status") not in ACTIVE:
                continue
            _reap_orphan(run.get("pid"), self.home)
            what = "running" if run["status"] == "running" else "queued"
            status = jobs.recover_run(run["run_dir"], f"the engine stopped while this job was {what}; resume it")
            log.warning("run %s was %s when the engine died; now %s", run["id"], what, status)

    async def _idle_watch(self) -> None:
        tick = min(1.0, max(0.05, self.idle_seconds / 10))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self.clients or self.queue or self.current:
                self._last_busy = now
            elif now - self._last_busy >= self.idle_seconds:
                self.request_stop(f"idle for {self.idle_seconds:g}s")
                return

    # -- the queue

    async def _scheduler(self) -> None:
        while True:
            while not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            job = self.current = self.queue.popleft()
            try:
                await self._run(job)
            except Exception:  # a bug here must not stall the queue behind this job
                log.exception("run %s: engine error", job.run_id)
                with contextlib.suppress(Exception):
                    self._finish(job, "interrupted", error="engine error (see engine.log); resume this run", write=True)
            finally:
                self.current = None
                self._last_busy = time.monotonic()

    async def _run(self, job: Job) -> None:
        job.done = asyncio.get_running_loop().create_future()
        try:
            worker = await self._ensure_worker()
        except EngineStartError as exc:
            self._finish(job, "interrupted", error=f"the worker did not start ({exc}); resume this run", write=True)
            return
        if job.finished or self._stopping:  # the engine stopped while the worker was starting
            return
        if job.cancel_requested:  # cancelled while the worker was starting
            self._finish(job, "cancelled", write=True)
            return
        job.worker, job.pid, job.status = worker, worker.pid, "running"
        await worker.send(protocol.RunJob(protocol.JobSpec(
            job.run_id, str(job.run_dir), job.kind, job.concept, job.params, job.resumed, job.attempts)))
        await job.done

    def _finish(self, job: Job, status: str, error: str | None = None, write: bool = False) -> None:
        """Settle a job: (write its final status,) forget it, end its subscribers' streams."""
        if job.finished:
            return
        if write:
            self._broadcast(job.run_id, jobs.set_status(job.run_dir, status, error=error))
        job.finished, job.status, job.pid = True, status, None
        self.active.pop(job.run_id, None)
        for member_id, member_status in jobs.settle_members(job.run_dir, status, error):
            self._broadcast(member_id, {"type": "status", "status": member_status})
            for q in self.subs.get(member_id, ()):
                q.put_nowait(("end", member_status))
        for q in self.subs.get(job.run_id, ()):
            q.put_nowait(("end", status))
        if job.done and not job.done.done():
            job.done.set_result(status)
        log.info("run %s %s%s", job.run_id, status, f": {error}" if error else "")

    def _broadcast(self, run_id: str, event: dict) -> None:
        for q in self.subs.get(run_id, ()):
            q.put_nowait(("event", event))

    # -- the worker

    async def _ensure_worker(self) -> WorkerProcess:
        async with self._worker_lock:
            if self.worker is not None:
                return self.worker
            env = dict(os.environ, TISTUDIO_ENGINE_PID=str(os.getpid()))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.worker", "--home", str(self.home),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=env, cwd=self.home, limit=STREAM_LIMIT)
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), WORKER_START_TIMEOUT)
                hello = protocol.Hello.from_wire(protocol.decode(line))
            except (asyncio.TimeoutError, ValueError):
                hello = None
            if hello is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                code = await proc.wait()
                raise EngineStartError(f"exit code {code}; see {log_path(self.home)}")
            worker = self.worker = WorkerProcess(proc)
            worker.reader = asyncio.create_task(self._read_worker(worker))
            log.info("worker %d started", worker.pid)
            return worker

    async def _stop_worker(self, worker: WorkerProcess) -> None:
        with contextlib.suppress(Exception):
            worker.proc.stdin.close()  # the worker exits on stdin EOF
        try:
            await asyncio.wait_for(worker.proc.wait(), 3.0)
        except asyncio.TimeoutError:
            worker.kill()
        if worker.reader:
            await worker.reader

    async def _read_worker(self, worker: WorkerProcess) -> None:
        try:
            while line := await worker.proc.stdout.readline():
                try:
                    msg = protocol.parse_worker_message(protocol.decode(line))
                except protocol.ProtocolError:
                    log.warning("worker %d said something unreadable: %r", worker.pid, line[:200])
                    continue
                try:
                    self._on_worker_message(msg)
                except Exception:  # keep reading: this task is how we notice the worker die
                    log.exception("could not handle worker message %r", msg)
        except (ValueError, ConnectionError) as exc:  # an over-long line: protocol broken
            log.error("worker %d: %s; killing it", worker.pid, exc)
            worker.kill()
        code = await worker.proc.wait()
        self._on_worker_exit(worker, code)

    def _on_worker_message(self, msg: protocol.Message) -> None:
        job = self.active.get(getattr(msg, "run_id", None))
        if isinstance(msg, protocol.Event):
            event = msg.event
            if job and event.get("type") == "status" and event.get("status") in ACTIVE:
                job.status = event["status"]
            if job and isinstance(event.get("step"), int):
                job.step = event["step"]
            self._broadcast(msg.run_id, event)
        elif isinstance(msg, protocol.Progress) and job:
            job.step = msg.step if msg.step is not None else job.step
            job.steps = msg.steps if msg.steps is not None else job.steps
            job.fields.update(msg.fields)
        elif isinstance(msg, protocol.Finished) and job:
            self._finish(job, msg.status, error=msg.error)
        elif isinstance(msg, protocol.DeviceReport):
            self.device = msg.device
            if self._device_future and not self._device_future.done():
                self._device_future.set_result(self.device)

    def _on_worker_exit(self, worker: WorkerProcess, code: int) -> None:
        log.info("worker %d exited (%s)", worker.pid, _describe_exit(code))
        if self.worker is worker:
            self.worker = None
        if self._device_future and not self._device_future.done():
            self._device_future.set_result(None)
        job = self.current
        if job is None or job.worker is not worker or job.finished:
            return
        # The log may already hold the job's final status (it died right after writing it).
        logged = jobs.last_status(job.run_dir)
        if logged in FINAL:
            jobs.update_run(job.run_dir, status=logged, pid=None)
            self._finish(job, logged)
        elif job.cancel_requested:
            self._finish(job, "cancelled", error="killed: it did not stop in time after the cancel", write=True)
        else:
            if self._stopping:
                why = f"the engine stopped ({self._stop_reason})"
            else:
                why = f"the worker died ({_describe_exit(code)})"
            self._finish(job, "interrupted", error=f"{why}; resume this run", write=True)

    # -- clients

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not _same_user(writer):
            writer.close()
            return
        self.clients += 1
        self._writers.add(writer)
        self._connections.add(asyncio.current_task())
        try:
            while line := await reader.readline():
                try:
                    req = protocol.parse_request(protocol.decode(line))
                except protocol.ProtocolError as exc:
                    await _send(writer, protocol.ErrorAnswer(f"bad request: {exc}"))
                    continue
                if isinstance(req, protocol.Subscribe):
                    await self._subscribe(req, writer)
                    continue
                answer = await self._answer(req)
                await _send(writer, answer)
                if isinstance(req, protocol.Stop) and not isinstance(answer, protocol.ErrorAnswer):
                    self.request_stop("stop requested")
        except (ConnectionError, ValueError):
            pass  # the client went away, or sent a line longer than STREAM_LIMIT
        finally:
            self.clients -= 1
            self._last_busy = time.monotonic()
            self._writers.discard(writer)
            self._connections.discard(asyncio.current_task())
            writer.close()

    async def _answer(self, req: protocol.Message) -> protocol.Message:
        handler = {
            protocol.Ping: self._op_ping, protocol.Status: self._op_status, protocol.Submit: self._op_submit,
            protocol.Cancel: self._op_cancel, protocol.Jobs: self._op_jobs, protocol.Stop: self._op_stop,
        }[type(req)]
        try:
            return await handler(req)
        except UserError as exc:
            return protocol.ErrorAnswer(str(exc), user=True)
        except Exception as exc:
            log.exception("op %s failed", req.NAME)
            return protocol.ErrorAnswer(f"{type(exc).__name__}: {exc}")

    async def _op_ping(self, req: protocol.Ping) -> protocol.PingAnswer:
        return protocol.PingAnswer(pid=os.getpid(), version=self.version)

    async def _op_status(self, req: protocol.Status) -> protocol.StatusAnswer:
        device = await self._probe_device() if req.device else self.device
        return protocol.StatusAnswer(
            pid=os.getpid(),
            version=self.version,
            home=str(self.home),
            started=self.started,
            uptime=time.time() - self.started,
            queue=len(self.queue),
            queued=[job.run_id for job in self.queue],
            running=self.current.summary() if self.current else None,
            worker_pid=self.worker.pid if self.worker else None,
            device=device or {"device": "unknown"},
            clients=self.clients,
            idle_seconds=self.idle_seconds,
        )

    async def _probe_device(self) -> dict | None:
        """Ask an idle worker (starting one if need be: it is the GPU process anyway);
        while a job runs, report the last answer rather than wait for the job."""
        if self.current is not None or self._stopping:
            return self.device
        try:
            worker = await self._ensure_worker()
        except EngineStartError:
            return self.device
        if self._device_future is None or self._device_future.done():
            self._device_future = asyncio.get_running_loop().create_future()
            await worker.send(protocol.ProbeDevice())
        try:
            return await asyncio.wait_for(asyncio.shield(self._device_future), DEVICE_TIMEOUT)
        except asyncio.TimeoutError:
            return self.device

    async def _op_submit(self, req: protocol.Submit) -> protocol.SubmitAnswer:
        if self._stopping:
            raise RuntimeError("the engine is stopping; submit again in a moment")
        if req.resume:
            job = self._resumed_job(req.resume, req.params)
        else:
            spec = {"kind": req.kind, "concept": req.concept, "params": req.params or {}}
            run_dir = jobs.create_run(self.home, spec)
            EventLog(run_dir / "events.jsonl").append({"type": "status", "status": "queued"})
            job = Job(run_dir.name, run_dir, spec["kind"], spec["concept"], spec["params"])
        self.active[job.run_id] = job
        self.queue.append(job)
        self._wakeup.set()
        return protocol.SubmitAnswer(job.run_id, str(job.run_dir), len(self.queue))

    def _resumed_job(self, run_id: str, params: dict | None) -> Job:
        if run_id in self.active:
            raise UserError(f"run {run_id} is already {self.active[run_id].status}")
        run_dir = jobs.find_run(self.home, run_id)
        record = jobs.load_run(run_dir)
        merged = {**(record.get("params") or {}), **(params or {})}
        jobs.set_status(run_dir, "queued", resume=True, params=merged, finished=None, pid=None)
        return Job(run_id, run_dir, record["kind"], record.get("concept"), merged,
                   step=record.get("step") or 0, steps=record.get("steps"),
                   attempts=record.get("attempts") or 0, resumed=True)

    async def _op_cancel(self, req: protocol.Cancel) -> protocol.CancelAnswer:
        run_id = req.run_id
        job = self.active.get(run_id)
        if job is None:
            status = jobs.load_run(jobs.find_run(self.home, run_id))["status"]
            raise UserError(f"run {run_id} is already {status}")
        if job in self.queue:
            self.queue.remove(job)
            self._finish(job, "cancelled", write=True)
            return protocol.CancelAnswer("cancelled")
        job.cancel_requested = True
        if job.worker:
            await job.worker.send(protocol.CancelJob(run_id))
            task = asyncio.create_task(self._enforce_cancel(job))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return protocol.CancelAnswer("cancelling")

    async def _enforce_cancel(self, job: Job) -> None:
        # A handler stuck in a long call (a model load) never reaches check_cancel.
        await asyncio.sleep(self.cancel_grace)
        if not job.finished and job.worker:
            log.warning("run %s ignored its cancel for %ss; killing worker %d",
                        job.run_id, self.cancel_grace, job.worker.pid)
            job.worker.kill()

    async def _op_jobs(self, req: protocol.Jobs) -> protocol.JobsAnswer:
        runs = await asyncio.to_thread(jobs.list_runs, self.home)
        positions = {job.run_id: i for i, job in enumerate(self.queue, start=1)}
        for run in runs:
            job = self.active.get(run["id"])
            if job:
                run.update(job.summary())
            run["position"] = positions.get(run["id"])
        return protocol.JobsAnswer(runs, [job.run_id for job in self.queue],
                                   self.current.run_id if self.current else None)

    async def _op_stop(self, req: protocol.Stop) -> protocol.StopAnswer:
        busy = len(self.queue) + (1 if self.current else 0)
        if busy and not req.force:
            raise UserError(f"the engine has {busy} job(s) queued or running; cancel them or stop with --force")
        return protocol.StopAnswer()

    # -- event streams

    async def _subscribe(self, req: protocol.Subscribe, writer: asyncio.StreamWriter) -> None:
        """Replay the run's log after `after_seq`, then follow live events, dropping any
        seq already sent.  We listen before reading the file, so nothing falls between."""
        run_id = req.run_id
        job = self.active.get(run_id)
        try:
            run_dir = job.run_dir if job else jobs.find_run(self.home, run_id)
        except UserError as exc:
            await _send(writer, protocol.ErrorAnswer(str(exc), user=True))
            return
        if job is None:  # a member of a running sweep follows its parent's life
            job = self.active.get(jobs.load_run(run_dir).get("parent") or "")
        q: asyncio.Queue = asyncio.Queue()
        self.subs[run_id].add(q)
        try:
            status = job.status if job else jobs.load_run(run_dir).get("status")
            events = await asyncio.to_thread(EventLog(run_dir / "events.jsonl").read, req.after_seq)
            last = req.after_seq
            if events:
                await _send_events(writer, events)
                last = events[-1].get("seq", last)
            if job is None or not req.follow:
                await _send(writer, protocol.StreamEnd(job.status if job else status))
                return
            await self._follow(q, writer, last)
        finally:
            self.subs[run_id].discard(q)
            if not self.subs[run_id]:
                del self.subs[run_id]

    async def _follow(self, q: asyncio.Queue, writer: asyncio.StreamWriter, last: int) -> None:
        while True:
            items = [await q.get()]
            while not q.empty():
                items.append(q.get_nowait())
            batch, end = [], None
            for what, payload in items:
                if what == "end":
                    end = payload
                    break
                if payload.get("seq", 0) > last:
                    batch.append(payload)
                    last = payload["seq"]
            if batch:
                await _send_events(writer, batch)
            if end is not None:
                await _send(writer, protocol.StreamEnd(end))
                return


async def _send(writer: asyncio.StreamWriter, message: protocol.Message) -> None:
    writer.write(protocol.encode(message))
    await writer.drain()


async def _send_events(writer: asyncio.StreamWriter, events: list[dict]) -> None:
    for i in range(0, len(events), EVENTS_PER_BATCH):
        await _send(writer, protocol.EventBatch(events[i:i + EVENTS_PER_BATCH]))


# ---------------------------------------------------------------------------
# Process helpers


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """The socket is 0600 in a 0700 directory; on Linux we also ask the kernel who called."""
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return True
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid != os.getuid():
        log.warning("refused a connection from uid %d", uid)
        return False
    return True


def _bind_socket(path: Path) -> socket.socket:
    # We hold the lock, so a socket file already here belongs to a dead engine.
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket_address(path) as address:
        sock.bind(address)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def _acquire_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by the worker
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _reap_orphan(pid: int | None, home: Path) -> None:
    """A worker of a dead engine dies with it (PDEATHSIG); wait for that, then make sure."""
    if not pid or not jobs.pid_alive(pid) or not _is_worker(pid, home):
        return
    deadline = time.monotonic() + 3.0
    while jobs.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if jobs.pid_alive(pid):
        log.warning("killing orphaned worker %d", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _is_worker(pid: int, home: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"engine.worker" in cmdline and os.fsencode(str(home)) in cmdline


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number of seconds") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.server")
    parser.add_argument("--home", default=None)
    parser.add_argument("--idle", type=float, default=None, help="seconds of quiet before exiting")
    parser.add_argument("--cancel-grace", type=float, default=None)
    args = parser.parse_args(argv)
    home = home_dir(args.home)
    ensure_private_dir(engine_dir(home))
    lock = _acquire_lock(protocol.lock_path(home))
    if lock is None:
        return 0  # another engine serves this home; the client will find it
    os.umask(0o077)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s engine[%(process)d] %(levelname)s %(message)s")
    idle = args.idle if args.idle is not None else _env_seconds("TISTUDIO_ENGINE_IDLE", DEFAULT_IDLE)
    grace = args.cancel_grace if args.cancel_grace is not None else _env_seconds(
        "TISTUDIO_ENGINE_CANCEL_GRACE", DEFAULT_CANCEL_GRACE)
    asyncio.run(EngineServer(home, idle_seconds=idle, cancel_grace=grace).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
