"""The only place the studio talks to the engine.

    screens ──calls──▶ EngineBridge ──async workers owned by the App──▶ EngineClient ──▶ engine
    screens ◀─Signal── StudioApp ◀──Textual messages (EngineSnapshot, RunEvents …)──┘

* Every request runs in an App-owned worker (popping a screen never cancels
  one) and reports back by posting a Textual message to the App; the App folds
  it into `StudioState` and tells the screens through a Signal.
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

Imports no torch: engine.client, engine.jobs and engine.errors are torch-free.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textual.message import Message

from engine.errors import EngineError, UserError
from engine.jobs import ACTIVE, FINAL

POLL_SECONDS = 1.5
DEVICE_POLL_SECONDS = 15.0
FLUSH_SECONDS = 0.2
MAX_LOG_LINES = 200


# ---------------------------------------------------------------------------
# What the studio knows about runs and the engine


@dataclass
class RunTrack:
    """One run as seen through its events (replayed history, then live)."""

    run_id: str
    kind: str | None = None
    concept: str | None = None
    last_seq: int = 0
    status: str | None = None
    error: str | None = None
    result: dict | None = None
    step: int = 0
    steps: int | None = None
    steps_per_s: float | None = None
    eta: float | None = None
    elapsed: float | None = None
    lr: float | None = None
    xs: list[int] = field(default_factory=list)  # logged steps
    loss: list[float] = field(default_factory=list)
    vram_steps: list[int] = field(default_factory=list)
    vram_allocated: list[float] = field(default_factory=list)
    vram_reserved: list[float] = field(default_factory=list)
    vram_total: float | None = None
    previews: list[dict] = field(default_factory=list)  # {step, path, prompt}
    embeddings: list[dict] = field(default_factory=list)  # {step, path, final}
    images: list[dict] = field(default_factory=list)  # generate: {path, mode, seed, prompt}
    progress: float | None = None  # 0..1 for jobs that report a fraction
    logs: list[str] = field(default_factory=list)
    complete: bool = False  # its final status is known and its log fully read
    live: bool = False  # seen queued or running: its end happens while we watch
    version: int = 0  # bumped on every change: screens redraw when it moves

    def apply(self, events: list[dict]) -> bool:
        """Fold events in (a seq already seen is skipped); True if anything changed."""
        changed = False
        for event in events:
            seq = event.get("seq")
            if isinstance(seq, int):
                if seq <= self.last_seq:
                    continue
                self.last_seq = seq
            try:
                self._apply_one(event)
            except (TypeError, ValueError, AttributeError, KeyError):
                continue  # an event of a shape we do not know (a newer engine, a hand edit): skip it
            changed = True
        if changed:
            self.version += 1
            # the last status of a batch says whether the run is live: a replayed history
            # holds old running/queued events that must not count
            self.live = self.status in ACTIVE
        return changed

    def _apply_one(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "step":
            self._step(event)
        elif kind == "status":
            self.status = event.get("status") or self.status
            if self.status not in FINAL:
                self.complete = False
            self.error = event.get("error") if self.status in ("failed", "interrupted", "cancelled") else None
            if isinstance(event.get("result"), dict):
                self.result = event["result"]
        elif kind == "preview" and event.get("path"):
            self.previews.append({k: event.get(k) for k in ("step", "path", "prompt")})
        elif kind == "embedding":
            self.embeddings.append({k: event.get(k) for k in ("step", "path", "final")})
        elif kind == "image" and event.get("path"):
            if all(img.get("path") != event["path"] for img in self.images):
                self.images.append({k: event.get(k) for k in ("path", "mode", "seed", "prompt")})
        elif kind == "progress":
            fraction = event.get("fraction", event.get("progress"))
            if isinstance(fraction, (int, float)):
                self.progress = float(fraction)
            if event.get("message") or event.get("stage"):
                self._log(str(event.get("message") or event.get("stage")))
        elif kind == "log" and event.get("message"):
            self._log(str(event["message"]))

    def _log(self, line: str) -> None:
        self.logs.append(line)
        del self.logs[:-MAX_LOG_LINES]

    def _step(self, event: dict) -> None:
        step = event.get("step")
        if not isinstance(step, int):
            return
        if self.xs and step <= self.xs[-1]:
            # A resumed run logs again from its checkpoint: keep one history, the latest.
            keep = sum(1 for s in self.xs if s < step)
            del self.xs[keep:], self.loss[keep:]
            keep_v = sum(1 for s in self.vram_steps if s < step)
            del self.vram_steps[keep_v:], self.vram_allocated[keep_v:], self.vram_reserved[keep_v:]
        loss = event.get("loss")
        self.xs.append(step)
        self.loss.append(float(loss) if isinstance(loss, (int, float)) else math.nan)
        self.step = step
        self.steps = event.get("steps") or self.steps
        for name in ("steps_per_s", "eta", "elapsed", "lr"):
            value = event.get(name)
            setattr(self, name, float(value) if isinstance(value, (int, float)) else None)
        if isinstance(event.get("vram_allocated"), (int, float)):
            self.vram_steps.append(step)
            self.vram_allocated.append(float(event["vram_allocated"]))
            self.vram_reserved.append(float(event.get("vram_reserved") or 0.0))
            if event.get("vram_total"):
                self.vram_total = float(event["vram_total"])

    def smoothed_loss(self) -> float | None:
        from tistudio.widgets.charts import ema

        values = ema(self.loss)
        return values[-1] if values else None


@dataclass
class StudioState:
    """Everything the screens draw from; changed only by the App's message handlers."""

    engine: str = "offline"  # offline | starting | online | lost | failed | disabled
    engine_detail: str = ""
    status: dict = field(default_factory=dict)
    jobs: list[dict] = field(default_factory=list)  # run.json records (oldest first)
    tracks: dict[str, RunTrack] = field(default_factory=dict)

    def track(self, run_id: str, job: dict | None = None) -> RunTrack:
        track = self.tracks.get(run_id)
        if track is None:
            track = self.tracks[run_id] = RunTrack(run_id)
        job = job or self.job(run_id)
        if job:
            track.kind = job.get("kind") or track.kind
            track.concept = job.get("concept") or track.concept
        return track

    def job(self, run_id: str | None) -> dict | None:
        if not run_id:
            return None
        for job in reversed(self.jobs):
            if job.get("id") == run_id:
                return job
        return None

    def jobs_of(self, kind: str, concept: str | None = None) -> list[dict]:
        return [j for j in self.jobs if j.get("kind") == kind and (concept is None or j.get("concept") == concept)]

    def queued(self) -> list[dict]:
        return sorted((j for j in self.jobs if j.get("status") == "queued"),
                      key=lambda j: (j.get("position") or 10**6, j.get("created") or 0))

    def running(self) -> dict | None:
        for job in self.jobs:
            if job.get("status") == "running":
                return job
        return None


# ---------------------------------------------------------------------------
# Messages the bridge posts to the App


class EngineStateChanged(Message):
    def __init__(self, state: str, detail: str = "") -> None:
        super().__init__()
        self.state, self.detail = state, detail


class EngineSnapshot(Message):
    """A poll's answer: engine status (may be None) and every run record."""

    def __init__(self, status: dict | None, jobs: list[dict] | None) -> None:
        super().__init__()
        self.status, self.jobs = status, jobs


class RunEvents(Message):
    def __init__(self, run_id: str, events: list[dict], ended: bool = False) -> None:
        super().__init__()
        self.run_id, self.events, self.ended = run_id, events, ended


class JobSubmitted(Message):
    def __init__(self, run_id: str, kind: str | None, concept: str | None, origin: str | None,
                 resumed: bool = False) -> None:
        super().__init__()
        self.run_id, self.kind, self.concept, self.origin, self.resumed = run_id, kind, concept, origin, resumed


class BridgeNotice(Message):
    """Something to tell the user: a notification, or a dialog when `details` are worth reading."""

    def __init__(self, text: str, severity: str = "error", title: str = "", details: str = "") -> None:
        super().__init__()
        self.text, self.severity, self.title, self.details = text, severity, title, details


class CommandFinished(Message):
    """A `tistudio …` subprocess (import, export) ended."""

    def __init__(self, origin: str, returncode: int, stdout: str, stderr: str) -> None:
        super().__init__()
        self.origin, self.returncode, self.stdout, self.stderr = origin, returncode, stdout, stderr


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or (type(exc).__name__ if isinstance(exc, BaseException) else "")
    return text[:limit]


# ---------------------------------------------------------------------------


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
        from engine.client import EngineClient

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
        from engine.jobs import list_runs

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
        from engine.jobs import EventLog, find_run

        job = self.app.state.job(run_id)
        try:
            run_dir = Path(job["run_dir"]) if job and job.get("run_dir") else find_run(self.home, run_id)
            track = self.app.state.track(run_id)
            events = EventLog(run_dir / "events.jsonl").read(track.last_seq)
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

    def run_cli(self, args: list[str], origin: str) -> None:
        """Run `tistudio ARGS` in a subprocess (for work that needs torch: import, export)."""
        self.app.run_worker(self._run_cli(args, origin), group="commands", exit_on_error=False)

    async def _run_cli(self, args: list[str], origin: str) -> None:
        env = dict(os.environ, TISTUDIO_HOME=str(self.home))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tistudio.cli", *args, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
            out, err = await proc.communicate()
        except OSError as exc:
            self.app.post_message(CommandFinished(origin, 1, "", one_line(exc)))
            return
        self.app.post_message(CommandFinished(origin, proc.returncode or 0, out.decode(errors="replace"),
                                              err.decode(errors="replace")))

    # --

    def _notice(self, text: str, severity: str = "error") -> None:
        if severity == "error" and text == self._last_error:
            return  # the same failure again (a retry loop): say it once
        if severity == "error":
            self._last_error = text
        self.app.post_message(BridgeNotice(text, severity))


def is_active(job: dict | None) -> bool:
    return bool(job) and job.get("status") in ACTIVE


def fmt_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    gib = n / 1024 ** 3
    return f"{gib:.1f} GiB" if gib >= 1 else f"{n / 1024 ** 2:.0f} MiB"
