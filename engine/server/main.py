"""The engine process: the socket clients talk to, and its lifecycle.

    python -m engine.server.main --home DIR [--idle SECONDS] [--ray auto|ADDRESS]

Started on demand by `engine.wire.client` in its own session, so closing the terminal
never stops a run.  One engine per home (an flock on engine/engine.lock; a second
server exits quietly with status 0).  It imports no torch: GPU work happens in the
workers (`engine.worker.main`), one child process per device ($TISTUDIO_DEVICES,
engine.devices.pool) that lives across jobs to keep models warm and is replaced if it
dies.  With --ray (or $TISTUDIO_RAY_ADDRESS) the workers are Ray actors on a
cluster instead (engine.server.ray_workers; the `cluster` extra).  The engine exits once
nothing is queued or running and no client has been connected for the idle period
(--idle, else $TISTUDIO_ENGINE_IDLE, else 30 minutes).

Files, in <home>/engine/ (0700):  engine.sock (0600), engine.lock, engine.pid, engine.log.

The server is assembled from units that each hold one concern:

    engine.wire.protocol     the wire: paths, encoding, one dataclass per message
    engine.server.queue    jobs waiting, in arrival order; every job not yet settled
    engine.server.scheduler    runs the queue on the workers, one job per worker; settles each job
    engine.server.placement    which job a free worker takes; how a sweep is split over workers
    engine.server.ledger       how each run ended, in memory first, written when the disk allows
    engine.server.supervisor   a worker process per device: start, read, notice its death, probe the device
    engine.server.ray_workers  the same, as Ray actors on a cluster (only with --ray)
    engine.server.fanout       live events to the clients following a run
    engine.server.operations   one method per request

This module keeps the rest: the lock, the socket and its connections, startup
recovery, the idle exit, retrying refused writes, and an orderly stop.

A full disk: every write the server makes goes through the ledger or is
allowed to fail (the pid file), so the server keeps answering from memory
(`status` and `jobs` say that it cannot write, and why) and writes what it
holds once there is room again.

Startup recovery: runs left queued or running by an engine that died are marked
`interrupted` (with a status event).  They are not restarted automatically; the
user resumes them (`submit` with "resume"), because a GPU job nobody asked for
right now could collide with whatever the user is doing after a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from engine.devices import pool as devices
from engine.errors import UserError
from engine.server import placement
from engine.server.fanout import Subscriptions, send
from engine.server.ledger import StatusLedger
from engine.server.operations import Operations
from engine.server.queue import JobQueue
from engine.server.scheduler import DEFAULT_CANCEL_GRACE, Scheduler
from engine.server.supervisor import LocalWorkers
from engine.store import runs as jobs
from engine.store.paths import atomic_write_text, ensure_private_dir, home_dir
from engine.store.runs import Run
from engine.wire import protocol
from engine.wire.protocol import CANNOT_START, STREAM_LIMIT, engine_dir, pid_path, socket_address, socket_path

DEFAULT_IDLE = 30 * 60.0
RETRY_WRITES_SECONDS = 2.0  # how often refused writes are tried again

log = logging.getLogger("tistudio.engine")
OWNER_ENV = "TISTUDIO_ENGINE_OWNER"  # a pid: the engine stops when that process is gone
OWNER_POLL_SECONDS = 0.5


def _owner_pid() -> int | None:
    value = os.environ.get(OWNER_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


class EngineServer:
    def __init__(self, home: Path, idle_seconds: float = DEFAULT_IDLE, cancel_grace: float = DEFAULT_CANCEL_GRACE,
                 pool=None, smallest_group: int = 1):
        self.home = Path(home)
        self.idle_seconds = idle_seconds
        self.queue = JobQueue()
        self.subscriptions = Subscriptions()
        self.ledger = StatusLedger(self.home)
        self.scheduler = Scheduler(self.home, self.queue, self.subscriptions, self.ledger, cancel_grace,
                                   pool=pool, smallest_group=smallest_group)
        self.operations = Operations(self.home, self.queue, self.scheduler, self.subscriptions, self.ledger,
                                     version=jobs.code_version(), idle_seconds=idle_seconds,
                                     clients=lambda: self.clients)
        self.clients = 0
        self._last_busy = time.monotonic()
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._listener: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._connections: set[asyncio.Task] = set()

    # -- lifecycle

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        await asyncio.to_thread(self._recover)
        await self.scheduler.start()  # joins and checks a Ray cluster: it may refuse, before anyone connects
        sock = _bind_socket(socket_path(self.home))
        self._listener = await asyncio.start_unix_server(self._client, sock=sock, limit=STREAM_LIMIT)
        # Only for people and tests: the socket is how clients find us, so a full disk may refuse it.
        self.ledger.write("the engine's pid file", lambda: atomic_write_text(pid_path(self.home), f"{os.getpid()}\n"))
        log.info("engine %s started (pid %d, idle exit after %ss, workers: %s)",
                 self.operations.version, os.getpid(), self.idle_seconds, self.scheduler.pool.describe())
        tasks = [asyncio.create_task(self.scheduler.run()), asyncio.create_task(self._idle_watch()),
                 asyncio.create_task(self._retry_writes())]
        owner = _owner_pid()
        if owner:
            tasks.append(asyncio.create_task(self._owner_watch(owner)))
        await self._stop.wait()
        await self._teardown(tasks)
        log.info("engine stopped: %s", self._stop_reason)

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    async def _teardown(self, tasks: list[asyncio.Task]) -> None:
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path(self.home).unlink()
        await self.scheduler.shutdown(self._stop_reason)
        self.ledger.retry()  # a last try: what stays unwritten, the next engine recovers as interrupted
        for task in tasks:
            task.cancel()
        await self._close_clients()
        with contextlib.suppress(FileNotFoundError):
            pid_path(self.home).unlink()

    async def _close_clients(self) -> None:
        # Subscribers were sent their end marker when their runs settled; give them a moment to flush it.
        deadline = time.monotonic() + 1.0
        while len(self.subscriptions) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for writer in list(self._writers):
            writer.close()
        # Let each connection handler see its EOF and return, rather than be cancelled
        # by asyncio.run (which logs a traceback per connection on Python 3.11).
        if self._connections:
            await asyncio.wait(self._connections, timeout=1.0)

    def _recover(self) -> None:
        """Mark runs that a dead engine left queued or running as interrupted."""
        for run in Run.all(self.home):
            if not run.is_active:
                continue
            _reap_orphan(run.get("pid"), self.home)
            what = run.status
            status = self.ledger.recover(run.dir, f"the engine stopped while this job was {what}; resume it")
            log.warning("run %s was %s when the engine died; now %s", run.id, what, status)

    async def _idle_watch(self) -> None:
        tick = min(1.0, max(0.05, self.idle_seconds / 10))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self.clients or self.scheduler.busy():
                self._last_busy = now
            elif now - self._last_busy >= self.idle_seconds:
                self.request_stop(f"idle for {self.idle_seconds:g}s")
                return

    async def _owner_watch(self, pid: int) -> None:
        """An engine started on behalf of one process ($TISTUDIO_ENGINE_OWNER: a test suite, a
        script) stops when that process is gone, whatever it was doing: its jobs end
        interrupted (resumable), as with `engine stop --force`."""
        while jobs.pid_alive(pid):
            await asyncio.sleep(OWNER_POLL_SECONDS)
        self.request_stop(f"its owner, process {pid}, is gone")

    async def _retry_writes(self) -> None:
        while True:
            await asyncio.sleep(RETRY_WRITES_SECONDS)
            if self.ledger.failure:
                self.ledger.retry()

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
                    await send(writer, protocol.ErrorAnswer(f"bad request: {exc}"))
                    continue
                if isinstance(req, protocol.Subscribe):
                    await self.operations.subscribe(req, writer)
                    continue
                answer = await self.operations.answer(req)
                await send(writer, answer)
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
    return b"engine.worker.main" in cmdline and os.fsencode(str(home)) in cmdline


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number of seconds") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.server.main")
    parser.add_argument("--home", default=None)
    parser.add_argument("--idle", type=float, default=None, help="seconds of quiet before exiting")
    parser.add_argument("--cancel-grace", type=float, default=None)
    parser.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                        help="run jobs on a Ray cluster (else $TISTUDIO_RAY_ADDRESS; off: on this machine)")
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
    try:
        pool = _worker_pool(home, args.ray)
        smallest = placement.min_group()
        asyncio.run(EngineServer(home, idle_seconds=idle, cancel_grace=grace, pool=pool,
                                 smallest_group=smallest).serve())
    except UserError as exc:  # a setting that cannot work: say so in the log's last line, exit 2
        log.error("cannot start: %s", exc)
        print(f"{CANNOT_START}{exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def _worker_pool(home: Path, ray: str | None):
    """Local workers (one per device), or Ray actors when --ray / $TISTUDIO_RAY_ADDRESS say so."""
    address = devices.ray_address(ray)
    if address:
        from engine.server.ray_workers import RayWorkers

        return RayWorkers(home, address)
    return LocalWorkers(home, devices.engine_devices())


if __name__ == "__main__":
    sys.exit(main())
