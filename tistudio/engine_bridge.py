"""The only place the studio talks to the engine.

    screens ──calls──▶ EngineBridge ──async workers owned by the App──▶ EngineClient ──▶ engine
    screens ◀─StudioChange── StudioApp ◀──bridge messages (EngineSnapshot, RunEvents …)──┘

* Every request runs in an App-owned worker (popping a screen never cancels
  one) and reports back by posting a message (tistudio.messages) to the App; the
  App folds it into `StudioState` (tistudio.state) and tells the screens what
  changed on its `changed` signal.
* The engine is started if it is not running (`connect(start=True)`); a lost
  connection turns into "engine: lost" and the bridge reconnects on its own.
* Runs are followed with `EngineClient.events` (history first, then live).
  Events are buffered and handed to the App at most five times a second,
  however fast they come, so a 100k-event history or a fast run never floods
  the UI.
* Engine errors become `BridgeNotice` messages (notifications); nothing a job
  or the engine does can raise into the UI.
* Offline (`enabled=False`, used by snapshot tests) the bridge never connects:
  it reads run records and event logs from the data directory instead.

Imports no torch: engine.wire.client, engine.store.runs and engine.errors are torch-free.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from engine.errors import EngineError, UserError, one_line
from tistudio.messages import (
    BridgeNotice,
    CliCommand,
    CommandFinished,
    EngineSnapshot,
    EngineStateChanged,
    JobSubmitted,
    RunEvents,
    Severity,
)

POLL_SECONDS = 1.5
DEVICE_POLL_SECONDS = 15.0
FLUSH_SECONDS = 0.2


class EngineBridge:
    def __init__(self, app, home: Path, *, enabled: bool = True, poll_seconds: float = POLL_SECONDS,
                 connect_timeout: float = 30.0):
        self.app = app
        self.home = Path(home)
        self.enabled = enabled
        self.poll_seconds = poll_seconds
        self.connect_timeout = connect_timeout
        self.client = None  # commands: submit, cancel
        self._poller = None  # polls: status, jobs (a device probe may take a while)
        self._following: set[str] = set()
        self._pending: dict[str, list[dict]] = defaultdict(list)
        self._ended: set[str] = set()
        self._poke: asyncio.Event | None = None  # made on the app's loop, in start()
        self._stopping = False
        self._last_error = ""

    # -- lifecycle

    @property
    def online(self) -> bool:
        return self.client is not None and self.app.state.engine == "online"

    def start(self) -> None:
        self.app.set_interval(FLUSH_SECONDS, self.flush, name="engine-flush")
        if not self.enabled:
            self.app.post_message(EngineStateChanged("disabled", "offline (engine not used)"))
            self.app.run_worker(self._offline_snapshot(), name="engine-offline", group="engine",
                                exit_on_error=False)
            return
        self._poke = asyncio.Event()
        self.app.run_worker(self._main(), name="engine", group="engine", exclusive=True, exit_on_error=False)

    async def stop(self) -> None:
        """Close our connections (the engine and its jobs keep running)."""
        self._stopping = True
        for client in (self.client, self._poller):
            if client is not None:
                try:
                    await client.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
        self.client = self._poller = None

    async def _main(self) -> None:
        from engine.wire.client import EngineClient

        backoff, failed_once = 1.0, False
        while not self._stopping:
            self.app.post_message(EngineStateChanged("starting", "connecting to the engine (starting it if need be)"))
            try:
                client = await EngineClient(self.home, timeout=self.connect_timeout).connect(start=True)
                poller = await EngineClient(self.home, timeout=self.connect_timeout).connect(start=True)
            except (EngineError, OSError) as exc:
                if not failed_once:  # the first time, the whole story (it may hold the engine's log)
                    failed_once = True
                    self.app.post_message(BridgeNotice(
                        "the engine did not start", "error", "Engine",
                        f"{exc}\n\nThe studio keeps trying; runs already started are safe on disk. "
                        f"Start it by hand to see why: tistudio --home {self.home} engine status"))
                else:
                    self._notice(f"cannot reach the engine: {one_line(exc)}")
                self.app.post_message(EngineStateChanged("failed", one_line(exc, 120)))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self.client, self._poller = client, poller
            backoff, self._last_error = 1.0, ""
            self.app.post_message(EngineStateChanged("online", f"engine pid {client.server_pid}"))
            try:
                await self._poll_loop()
            except (EngineError, OSError, asyncio.IncompleteReadError) as exc:
                if self._stopping:
                    return
                self.app.post_message(EngineStateChanged("lost", one_line(exc, 120)))
            finally:
                for c in (client, poller):
                    try:
                        await c.close()
                    except Exception:  # noqa: BLE001
                        pass
                self.client = self._poller = None
            self._following.clear()
            await asyncio.sleep(1.0)

    async def _poll_loop(self) -> None:
        device_at = -math.inf
        while not self._stopping:
            jobs = await self._poller.jobs()
            status = await self._poller.status(device=False)
            self.app.post_message(EngineSnapshot(status, jobs))
            now = time.monotonic()
            if not status.get("running") and now - device_at > DEVICE_POLL_SECONDS:
                device_at = now
                # Asks the worker (starting one: it is the GPU process anyway); may take seconds.
                status = await self._poller.status(device=True)
                self.app.post_message(EngineSnapshot(status, None))
            self._poke.clear()
            try:
                await asyncio.wait_for(self._poke.wait(), self.poll_seconds)
            except asyncio.TimeoutError:
                pass

    def poll_now(self) -> None:
        if self._poke is not None:
            self._poke.set()

    async def _offline_snapshot(self) -> None:
        from engine.store.runs import list_runs

        try:
            jobs = await asyncio.to_thread(list_runs, self.home)
        except OSError as exc:
            self._notice(f"cannot read runs in {self.home}: {one_line(exc)}")
            jobs = []
        self.app.post_message(EngineSnapshot({}, jobs))

    def refresh_offline(self) -> None:
        if not self.enabled:
            self.app.run_worker(self._offline_snapshot(), name="engine-offline", group="engine", exit_on_error=False)

    # -- events

    def follow(self, run_id: str) -> None:
        """Replay run `run_id` and follow it live (no-op while it is already followed)."""
        if not run_id or run_id in self._following:
            return
        self._following.add(run_id)
        if not self.online:
            self._read_log(run_id)
            self._following.discard(run_id)
            return
        self.app.run_worker(self._follow(run_id), name=f"follow-{run_id}", group="follow", exit_on_error=False)

    def following(self, run_id: str) -> bool:
        return run_id in self._following

    async def _follow(self, run_id: str) -> None:
        ended = False
        try:
            track = self.app.state.track(run_id)
            async for event in self.client.events(run_id, after_seq=track.last_seq):
                self._pending[run_id].append(event)
            ended = True
        except UserError as exc:
            self._notice(one_line(exc))
            ended = True
        except (EngineError, OSError, asyncio.IncompleteReadError):
            pass  # the engine went away: _main reconnects and the App follows again
        except Exception as exc:  # noqa: BLE001 - a bug here must not take the studio down
            self._notice(f"following run {run_id}: {type(exc).__name__}: {one_line(exc)}")
        finally:
            self._following.discard(run_id)
            if ended:
                self._ended.add(run_id)

    def _read_log(self, run_id: str) -> None:
        from engine.store.events import EventLog, events_path
        from engine.store.runs import find_run

        job = self.app.state.job(run_id)
        try:
            run_dir = Path(job["run_dir"]) if job and job.get("run_dir") else find_run(self.home, run_id)
            track = self.app.state.track(run_id)
            events = EventLog(events_path(run_dir)).read(track.last_seq)
        except (UserError, OSError) as exc:
            self._notice(one_line(exc))
            return
        self._pending[run_id].extend(events)
        self._ended.add(run_id)

    def flush(self) -> None:
        """Hand buffered events to the App (runs on a timer: a few times a second)."""
        if not self._pending and not self._ended:
            return
        pending, self._pending = self._pending, defaultdict(list)
        ended, self._ended = self._ended, set()
        for run_id in set(pending) | ended:
            self.app.post_message(RunEvents(run_id, pending.get(run_id, []), ended=run_id in ended))

    # -- commands

    def submit(self, kind: str | None, concept: str | None = None, params: dict | None = None, *,
               resume: str | None = None, origin: str | None = None) -> None:
        """Queue a job (or `resume` a run); `origin`, the asking screen's mode, comes back in JobSubmitted."""
        self.app.run_worker(self._submit(kind, concept, params, resume, origin), group="commands",
                            exit_on_error=False)

    async def _submit(self, kind, concept, params, resume, origin) -> None:
        if not self.online:
            self._notice("the engine is not connected yet; try again in a moment", "warning")
            return
        try:
            run_id = await self.client.submit(kind, concept=concept, params=params, resume=resume)
        except (UserError, EngineError, OSError) as exc:
            self._notice(one_line(exc))
            return
        job = {"id": run_id, "kind": kind, "concept": concept, "status": "queued"}
        self.app.post_message(JobSubmitted(run_id, kind, concept, origin, resumed=bool(resume)))
        self.app.state.track(run_id, job)
        self.follow(run_id)
        self.poll_now()

    def cancel(self, run_id: str) -> None:
        self.app.run_worker(self._cancel(run_id), group="commands", exit_on_error=False)

    async def _cancel(self, run_id: str) -> None:
        if not self.online:
            self._notice("the engine is not connected; cannot cancel now", "warning")
            return
        try:
            answer = await self.client.cancel(run_id)
        except (UserError, EngineError, OSError) as exc:
            self._notice(one_line(exc))
            return
        self._notice(f"run {run_id}: {answer}", "information")
        self.poll_now()

    def run_cli(self, command: CliCommand, args: list[str]) -> None:
        """Run `tistudio COMMAND ARGS` in a subprocess (for work that needs torch: import, export)."""
        self.app.run_worker(self._run_cli(command, args), group="commands", exit_on_error=False)

    async def _run_cli(self, command: CliCommand, args: list[str]) -> None:
        env = dict(os.environ, TISTUDIO_HOME=str(self.home))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tistudio.cli", command, *args, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
            out, err = await proc.communicate()
        except OSError as exc:
            self.app.post_message(CommandFinished(command, 1, "", one_line(exc)))
            return
        self.app.post_message(CommandFinished(command, proc.returncode or 0, out.decode(errors="replace"),
                                              err.decode(errors="replace")))

    # --

    def _notice(self, text: str, severity: Severity = "error") -> None:
        if severity == "error" and text == self._last_error:
            return  # the same failure again (a retry loop): say it once
        if severity == "error":
            self._last_error = text
        self.app.post_message(BridgeNotice(text, severity))

