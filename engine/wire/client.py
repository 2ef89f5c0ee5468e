"""The async client the CLI and the studio use to talk to the engine.

    async with EngineClient(home) as engine:          # starts the engine if need be
        run_id = await engine.submit("train", concept="cat", params={...})
        async for event in engine.events(run_id):      # history first, then live
            ...

From synchronous code (the CLI):  `call("submit", "train", concept="cat")`.
Imports no torch; the wire protocol is engine.wire.protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import engine
from engine.errors import EngineError, UserError
from engine.store.paths import ensure_private_dir, home_dir
from engine.store.runs import FINAL, code_version, pid_alive
from engine.wire import protocol
from engine.wire.protocol import STREAM_LIMIT, engine_dir, log_path, socket_address, socket_path

CONNECT_TIMEOUT = 20.0
RAY_CONNECT_TIMEOUT = 180.0  # an engine on Ray joins the cluster and checks its storage before it listens
MAX_LOG_BYTES = 5 * 1024 * 1024

# What a connect attempt raises while there is no engine (yet) or it is going away.
_NOT_THERE = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError,
              asyncio.IncompleteReadError)


class EngineNotRunning(EngineError):
    """connect(start=False) found no engine."""


class EngineClient:
    def __init__(self, home: os.PathLike | str | None = None, timeout: float | None = None):
        self.home = home_dir(home)
        self.timeout = timeout if timeout is not None else _connect_timeout()
        self.server_pid: int | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()  # one request in flight per connection
        self._spawned: subprocess.Popen | None = None
        self._version_checked = False

    async def __aenter__(self) -> "EngineClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- connecting

    async def connect(self, start: bool = True) -> "EngineClient":
        """Connect, starting the engine when there is none (unless start=False).

        Two clients racing here both spawn a server; the flock lets one win and the
        other exit at once, and both clients end up connected to the winner."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        delay, spawned_at = 0.02, -1.0
        while True:
            try:
                self._reader, self._writer = await self._open()
                # Bounded: an engine that accepts but never answers must not hang us.
                hello = protocol.PingAnswer.from_wire(
                    await asyncio.wait_for(self._call(protocol.Ping()), max(1.0, deadline - loop.time())))
                self.server_pid = hello.pid
                if start and await self._replaced_stale(hello):
                    continue  # an idle engine from older code stopped: start ours
                return self
            except _NOT_THERE:
                await self._drop()
            except asyncio.TimeoutError:
                await self._drop()
                raise EngineError(f"the engine for {self.home} accepts connections but does not answer; "
                                  f"see {log_path(self.home)}") from None
            if not start:
                raise EngineNotRunning(f"no engine is running for {self.home}")
            now = loop.time()
            if now > deadline:
                raise EngineError(f"the engine did not start within {self.timeout:g}s; see {log_path(self.home)}")
            if self._may_spawn(now - spawned_at):
                self._spawn()
                spawned_at = now
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    async def _replaced_stale(self, hello: protocol.PingAnswer) -> bool:
        """Stop an idle engine whose code differs from ours (an upgrade or an edit since it
        started); a busy one is left alone, its jobs matter more."""
        if self._version_checked or hello.version == code_version():
            return False
        self._version_checked = True
        status = protocol.StatusAnswer.from_wire(await self._call(protocol.Status(device=False)))
        if status.running or status.queue:
            return False
        await self.stop(force=False, wait=True)
        return True

    def _may_spawn(self, since_last: float) -> bool:
        proc = self._spawned
        if proc is None:
            return True
        code = proc.poll()
        if code is None:
            return False  # still starting up
        if code == 2:
            reason = _refusal(self.home)
            if reason:
                raise UserError(reason)
        if code != 0:
            raise EngineError(f"the engine failed to start (exit code {code}):\n{_log_tail(self.home)}")
        # It exited quietly: another engine held the lock.  If that one was on its way
        # out, nobody will answer, so try again now and then.
        return since_last > 0.5

    def _spawn(self) -> None:
        ensure_private_dir(engine_dir(self.home))
        logfile = _open_log(self.home)
        env = dict(os.environ)
        # The engine must import this very engine package, wherever we were started from.
        package_root = str(Path(engine.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            self._spawned = subprocess.Popen(
                [sys.executable, "-m", "engine.server.main", "--home", str(self.home)],
                stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                cwd=self.home, env=env, start_new_session=True)  # not a child of the terminal's session
        finally:
            logfile.close()

    async def _open(self):
        with socket_address(socket_path(self.home)) as address:
            return await asyncio.open_unix_connection(address, limit=STREAM_LIMIT)

    async def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def close(self) -> None:
        await self._drop()
        if self._spawned is not None:
            self._spawned.poll()  # reap it if it has already exited

    # -- requests

    async def _call(self, request: protocol.Message) -> dict:
        if self._writer is None:
            raise EngineError("not connected; call connect() first")
        async with self._lock:
            self._writer.write(protocol.encode(request))
            await self._writer.drain()
            line = await self._reader.readline()
        if not line:
            raise ConnectionResetError("the engine closed the connection")
        return _checked(protocol.decode(line))

    async def request(self, request: protocol.Message, answer: type[protocol.Message]) -> Any:
        """Send one request and read its answer as `answer`; a lost connection or a
        malformed answer becomes EngineError."""
        try:
            return answer.from_wire(await self._call(request))
        except _NOT_THERE as exc:
            raise EngineError(f"lost the connection to the engine: {exc}") from None
        except protocol.ProtocolError as exc:
            raise EngineError(f"the engine answered {request.NAME} oddly ({exc}); is it an older version?") from None

    async def ping(self) -> dict:
        return (await self.request(protocol.Ping(), protocol.PingAnswer)).to_wire()

    async def status(self, device: bool = True) -> dict:
        """The engine's state as a dict (engine.wire.protocol.StatusAnswer): pid, version, uptime,
        queue, queued, running (the running job or None), worker_pid, device, environment, storage …"""
        return (await self.request(protocol.Status(device=device), protocol.StatusAnswer)).to_wire()

    async def submit(self, kind: str | None = None, concept: str | None = None,
                     params: dict | None = None, resume: str | None = None) -> str:
        """Queue a job (or re-queue run `resume`, merging `params` into its own); return the run id."""
        if resume:
            request = protocol.Submit(resume=resume, params=params)
        else:
            request = protocol.Submit(kind=kind, concept=concept, params=params or {})
        return (await self.request(request, protocol.SubmitAnswer)).run_id

    async def cancel(self, run_id: str) -> str:
        """Cancel a queued or running job; returns "cancelled" or "cancelling"."""
        return (await self.request(protocol.Cancel(run_id), protocol.CancelAnswer)).status

    async def jobs(self) -> list[dict]:
        """Every run (oldest first): run.json fields plus run_dir and queue position."""
        return (await self.request(protocol.Jobs(), protocol.JobsAnswer)).jobs

    async def listing(self) -> dict:
        """`jobs` with the engine's view around it (engine.wire.protocol.JobsAnswer): jobs, queue,
        running, and storage (whether it can write to its home; if not, why)."""
        return (await self.request(protocol.Jobs(), protocol.JobsAnswer)).to_wire()

    async def stop(self, force: bool = False, wait: bool = True) -> None:
        """Ask the engine to exit (force: even with jobs queued or running, which become
        interrupted); with wait, return once its process is gone."""
        pid = self.server_pid
        await self.request(protocol.Stop(force=force), protocol.StopAnswer)
        await self._drop()
        if wait and pid:
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                if self._spawned is not None:
                    self._spawned.poll()
                if not pid_alive(pid):
                    return
                await asyncio.sleep(0.05)
            raise EngineError(f"the engine (pid {pid}) did not exit")

    async def events(self, run_id: str, after_seq: int = 0, follow: bool = True) -> AsyncIterator[dict]:
        """Yield the run's events with seq > after_seq, then (follow) live ones until the
        run reaches a final status.  Uses a connection of its own.  To resume after a
        lost connection, call again with after_seq = the last seq seen.

        When the disk refused the run's final status event, the engine still knows it:
        the stream then ends with that status event made up from memory (no seq, and
        "unsaved": why it is not on disk)."""
        sub = EngineClient(self.home, timeout=self.timeout)
        await sub.connect()
        last_status = None
        try:
            sub._writer.write(protocol.encode(protocol.Subscribe(run_id, after_seq, follow)))
            await sub._writer.drain()
            while True:
                line = await sub._reader.readline()
                if not line:
                    raise EngineError(f"the engine went away while following run {run_id}")
                msg = _checked(protocol.decode(line))
                if msg.get("end"):
                    end = protocol.StreamEnd.from_wire(msg)
                    if end.unsaved and end.status != last_status:
                        yield {"type": "status", "status": end.status, "error": end.reason, "unsaved": end.unsaved}
                    return
                for event in protocol.EventBatch.from_wire(msg).events:
                    if event.get("type") == "status":
                        last_status = event.get("status")
                    yield event
        finally:
            await sub.close()

    async def wait(self, run_id: str) -> str:
        """Follow a run to its end and return its final status."""
        status = None
        async for event in self.events(run_id):
            if event.get("type") == "status":
                status = event.get("status")
        if status not in FINAL:  # the end marker carries it even when the log does not
            status = await self._final_status(run_id)
        return status

    async def _final_status(self, run_id: str) -> str | None:
        for run in await self.jobs():
            if run["id"] == run_id:
                return run["status"]
        return None


def _connect_timeout() -> float:
    """How long to wait for an engine to answer: longer when the one we start joins a Ray cluster."""
    from engine.devices.pool import ray_address

    return RAY_CONNECT_TIMEOUT if ray_address() else CONNECT_TIMEOUT


def _checked(msg: dict) -> dict:
    """`msg`, unless it is an ErrorAnswer: then UserError (user=True) or EngineError."""
    if "error" in msg:
        answer = protocol.ErrorAnswer.from_wire(msg)
        raise (UserError if answer.user else EngineError)(answer.error)
    return msg


def _open_log(home: Path):
    path = log_path(home)
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > MAX_LOG_BYTES:
            os.replace(path, path.with_suffix(".log.1"))
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


def _refusal(home: Path) -> str | None:
    """Why the engine refused to start (protocol.CANNOT_START), from its log's last lines."""
    for line in reversed(_log_tail(home).splitlines()):
        if line.startswith(protocol.CANNOT_START):
            return line[len(protocol.CANNOT_START):]
    return None


def _log_tail(home: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log_path(home).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no engine log)"


# ---------------------------------------------------------------------------
# Synchronous use (the CLI, scripts)


def call(method: str, *args: Any, home: os.PathLike | str | None = None, start: bool = True, **kwargs: Any) -> Any:
    """Run one client method to completion: `call("jobs")`, `call("cancel", run_id)`."""

    async def go():
        client = EngineClient(home)
        await client.connect(start=start)
        try:
            return await getattr(client, method)(*args, **kwargs)
        finally:
            await client.close()

    return asyncio.run(go())
