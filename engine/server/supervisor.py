"""The worker supervisor: one worker process for one device, kept alive across jobs.

It starts the worker when work arrives (`python -m engine.worker.main`, a child that
keeps models warm between jobs), reads every message the worker writes, notices
when it dies (the next job then gets a fresh one), and says what device the
worker has, without starting one to ask (engine.devices.probe).  It knows no
queue: whoever feeds it (engine.server.scheduler) decides what runs when, and hears
back through two callbacks, `on_message` and `on_exit`.
So the server holds one supervisor per device and feeds them from one queue; the
worker learns its device from its environment (engine.devices.pool.worker_env).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from engine.devices import pool as devices
from engine.devices import probe as device_probe
from engine.server import zygote
from engine.store.runs import pid_alive
from engine.wire import protocol
from engine.wire.protocol import STREAM_LIMIT, JobSpec, log_path

START_TIMEOUT = 60.0  # seconds for a new worker to say hello
PROBE_TIMEOUT = 5.0  # seconds for an idle worker to answer a device probe (torch is loaded already)
STOP_TIMEOUT = 3.0  # seconds a worker has to exit on stdin EOF before it is killed

log = logging.getLogger("tistudio.engine")


class WorkerStartError(Exception):
    """The worker process did not start (or did not say hello in time)."""


class WorkerProcess:
    """One running `engine.worker.main` child and the task reading its stdout."""

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

    def alive(self) -> bool:
        """Whether the process is still there (a zombie is not), asked of the system now rather
        than learnt from its stdout closing, which the reader task hears only later."""
        return pid_alive(self.pid)


MessageCallback = Callable[[WorkerProcess, protocol.Message], None]
ExitCallback = Callable[[WorkerProcess, "int | None", "str | None"], None]


class WorkerSupervisor:
    """Keeps one worker for `device` ("auto": the worker picks, as `engine.devices.runtime.pick_device` does),
    with `threads` CPU threads when it shares the CPU with other workers (engine.devices.pool).

    on_message(worker, message) hears every message but the hello; on_exit(worker, exit code,
    run id it was running or None) hears each worker's death, after the supervisor has
    forgotten it."""

    backend = "local"
    node: str | None = None

    def __init__(self, home: os.PathLike | str, device: str = "auto", *, threads: int | None = None,
                 on_message: MessageCallback | None = None, on_exit: ExitCallback | None = None,
                 start_timeout: float = START_TIMEOUT, probe_timeout: float = PROBE_TIMEOUT,
                 spawner: zygote.WarmSpawner | None = None):
        self.home = Path(home)
        self.spawner = spawner  # forks warm workers (engine.server.zygote); None: each starts on its own
        self.device = device
        self.threads = threads
        self.worker: WorkerProcess | None = None
        self.in_flight: str | None = None  # the run id the worker is running
        self.last_device: dict | None = None  # the worker's last DeviceReport
        self.start_timeout = start_timeout
        self.probe_timeout = probe_timeout
        self._on_message = on_message or (lambda worker, msg: None)
        self._on_exit = on_exit or (lambda worker, code, run_id: None)
        self._starting = asyncio.Lock()
        self._device_answer: asyncio.Future | None = None

    @property
    def pid(self) -> int | None:
        return self.worker.pid if self.worker else None

    # -- starting and stopping

    async def ensure(self, warm: bool = False) -> WorkerProcess:
        """The live worker, starting one if there is none (`warm`: one that has torch imported
        already, for a job that needs it); WorkerStartError if it will not start."""
        async with self._starting:
            if self.worker is not None and not self.worker.alive():
                await self._bury(self.worker)  # died since we last heard from it: no job goes to it
            if self.worker is None:
                self.worker = await self._spawn(warm)
                self.worker.reader = asyncio.create_task(self._read(self.worker))
                log.info("worker %d started for device %s%s", self.worker.pid, self.device,
                         f" ({self.threads} CPU thread(s))" if self.threads else "")
            return self.worker

    async def _bury(self, dead: WorkerProcess) -> None:
        """A worker found dead before its reader noticed: let the reader see the end of its
        output and report the exit (on_exit settles what it was running), then forget it."""
        if dead.reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(dead.reader), STOP_TIMEOUT)
        if self.worker is dead:  # the reader did not finish in time: forget it ourselves
            self.worker = None

    def worker_env(self) -> dict[str, str]:
        """The environment a worker of this supervisor runs in."""
        env = dict(os.environ, TISTUDIO_ENGINE_PID=str(os.getpid()))
        if self.device == "auto":
            return devices.in_bus_order(env)
        return devices.worker_env(self.device, self.threads, env)

    async def _spawn(self, warm: bool) -> WorkerProcess:
        env = self.worker_env()
        proc = await self.spawner.spawn(env, warm=warm) if self.spawner else None
        if proc is None:  # no zygote here (or it gave up): a worker of its own
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.worker.main", "--home", str(self.home),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=env, cwd=self.home, limit=STREAM_LIMIT)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self.start_timeout)
            protocol.Hello.from_wire(protocol.decode(line))
        except (asyncio.TimeoutError, ValueError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            code = await proc.wait()
            raise WorkerStartError(f"exit code {code}; see {log_path(self.home)}") from None
        return WorkerProcess(proc)

    async def stop(self) -> None:
        """Ask the worker to exit (stdin EOF), kill it if it does not, and wait for its reader
        (which reports the exit through on_exit)."""
        worker = self.worker
        if worker is None:
            return
        with contextlib.suppress(Exception):
            worker.proc.stdin.close()
        try:
            await asyncio.wait_for(worker.proc.wait(), STOP_TIMEOUT)
        except asyncio.TimeoutError:
            worker.kill()
        if worker.reader:
            await worker.reader

    def kill(self) -> None:
        if self.worker:
            self.worker.kill()

    # -- jobs

    async def start_job(self, job: JobSpec) -> WorkerProcess:
        """Hand `job` to the worker (starting one if need be); its messages follow via on_message."""
        worker = await self.ensure(warm=zygote.wants_warm(job.kind))
        self.in_flight = job.run_id
        await worker.send(protocol.RunJob(job))
        return worker

    async def cancel(self, run_id: str) -> None:
        if self.worker:
            await self.worker.send(protocol.CancelJob(run_id))

    # -- the device

    def fits(self, requested: str | None) -> bool:
        """Whether a job asking for device `requested` (or None) may run on this worker."""
        return self.device == "auto" or devices.fits(requested, self.device)

    async def probe_device(self, gpus: list | None = None) -> dict:
        """What a worker here runs on, never by starting one: an idle worker that has loaded
        torch answers with torch's own figures (source "worker"); otherwise (no worker, one
        busy with a job, or one without torch yet) the torch-free probe answers (`gpus`:
        nvidia-smi's list, when the caller has it already)."""
        if self.worker is not None and self.in_flight is None:
            answer = await self._ask_worker(self.worker)
            if answer:
                return {**answer, "source": "worker"}
        found = await asyncio.to_thread(device_probe.probe, self.worker_env(), gpus)
        if found.get("source") == "TISTUDIO_DEVICE" and self.device != "auto":
            found["source"] = "engine"  # the engine gave the worker this device (TISTUDIO_DEVICES)
        return found

    def memory(self) -> dict:
        """The worker process's resident memory ({"rss": bytes}, Linux), or {}."""
        if self.worker is None:
            return {}
        try:
            pages = int(Path(f"/proc/{self.worker.pid}/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return {}
        return {"rss": pages * os.sysconf("SC_PAGE_SIZE")}

    async def _ask_worker(self, worker: WorkerProcess) -> dict | None:
        if self._device_answer is None or self._device_answer.done():
            self._device_answer = asyncio.get_running_loop().create_future()
            await worker.send(protocol.ProbeDevice())
        try:
            return await asyncio.wait_for(asyncio.shield(self._device_answer), self.probe_timeout)
        except asyncio.TimeoutError:
            return None

    # -- reading the worker

    async def _read(self, worker: WorkerProcess) -> None:
        try:
            while line := await worker.proc.stdout.readline():
                try:
                    msg = protocol.parse_worker_message(protocol.decode(line))
                except protocol.ProtocolError:
                    log.warning("worker %d said something unreadable: %r", worker.pid, line[:200])
                    continue
                try:
                    self._heard(worker, msg)
                except Exception:  # keep reading: this task is how we notice the worker die
                    log.exception("could not handle worker message %r", msg)
        except (ValueError, ConnectionError) as exc:  # an over-long line: protocol broken
            log.error("worker %d: %s; killing it", worker.pid, exc)
            worker.kill()
        code = await worker.proc.wait()
        self._exited(worker, code)

    def _heard(self, worker: WorkerProcess, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.DeviceReport):
            self.last_device = msg.device
            if self._device_answer and not self._device_answer.done():
                self._device_answer.set_result(msg.device)
        elif isinstance(msg, protocol.Finished) and msg.run_id == self.in_flight:
            self.in_flight = None
        self._on_message(worker, msg)

    def _exited(self, worker: WorkerProcess, code: int | None) -> None:
        log.info("worker %d exited (%s)", worker.pid, describe_exit(code))
        run_id = None
        if self.worker is worker:
            self.worker = None
            run_id, self.in_flight = self.in_flight, None
        if self._device_answer and not self._device_answer.done():
            self._device_answer.set_result(None)
        try:
            self._on_exit(worker, code, run_id)
        except Exception:  # logged: the next job still gets a fresh worker
            log.exception("could not handle the exit of worker %d", worker.pid)


class LocalWorkers:
    """The local pool: one worker process per device of this machine (engine.devices.pool)."""

    kind = "local"

    def __init__(self, home: os.PathLike | str, device_list: list[str] | None = None):
        self.home = Path(home)
        self.devices = list(device_list) if device_list is not None else devices.engine_devices()
        # One zygote for the box: every worker, first or restarted, forks from it already warm.
        self.spawner = zygote.WarmSpawner(self.home, STREAM_LIMIT)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        await self.spawner.close()

    def supervisors(self, on_message, on_exit) -> list[WorkerSupervisor]:
        """A supervisor per device; the callbacks get the worker's index first."""
        threads = devices.cpu_threads(self.devices)
        return [WorkerSupervisor(self.home, device, threads=threads if device == "cpu" else None,
                                 on_message=functools.partial(on_message, i), on_exit=functools.partial(on_exit, i),
                                 spawner=self.spawner)
                for i, device in enumerate(self.devices)]

    def check_device(self, requested: str | None) -> None:
        if "auto" not in self.devices:
            devices.check_request(requested, self.devices)

    async def gpus(self) -> list | None:
        """nvidia-smi's GPUs, asked once for every worker's probe (None: each probes alone)."""
        if all(d == "cpu" for d in self.devices):
            return []
        return await asyncio.to_thread(device_probe.all_gpus)

    def describe(self) -> dict:
        return {"kind": self.kind, "devices": list(self.devices), "fork": self.spawner.describe()}


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
