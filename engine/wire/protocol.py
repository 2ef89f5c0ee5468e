"""The engine's wire protocol: where it listens, how a message is encoded, and every message.

Two conversations, both newline-delimited JSON (one object per line, UTF-8):

    client  ──Unix socket <home>/engine/engine.sock──▶  server     requests, each with an "op"
    server  ──stdin / stdout of the worker process───▶  worker     commands ("op") and messages ("msg")

Client and server.  Each request gets one answer, except `subscribe`, which
streams `EventBatch` lines and then one `StreamEnd`.  A failed request is
answered with `ErrorAnswer` ({"error": message, "user": bool}; user=True marks a
mistake the user can fix, such as an unknown run id).

    Ping                                  -> PingAnswer
    Status(device=True)                   -> StatusAnswer
    Submit(kind, concept, params)         -> SubmitAnswer
    Submit(resume=run_id, params?)        -> SubmitAnswer   (params merged into the run's own)
    Cancel(run_id)                        -> CancelAnswer   (status "cancelled" or "cancelling")
    Jobs                                  -> JobsAnswer
    Subscribe(run_id, after_seq, follow)  -> EventBatch ... StreamEnd
    Stop(force=False)                     -> StopAnswer, then the engine exits

Server and worker.  The server sends `RunJob`, `CancelJob` and `ProbeDevice`;
the worker says `Hello` once, then `Event` (a record already in the run's
events.jsonl), `Progress`, `Finished` and `DeviceReport`.

Every message is a dataclass below: `to_wire()` gives the JSON object, and
`from_wire()` checks one (required fields present, JSON types right) and raises
`ProtocolError` otherwise.  Run events themselves (status, step, checkpoint …)
stay plain dicts: they are the records of engine.store.runs.EventLog, the source of truth.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterator, Union

from engine.store.events import json_line

PROTOCOL = 1
STREAM_LIMIT = 64 * 1024 * 1024  # the longest line either side accepts (a batch of replayed events)
EVENTS_PER_BATCH = 1000  # events per EventBatch line when replaying a log
# An engine that refuses to start (a setting that cannot work: a bad TISTUDIO_DEVICES, a Ray
# cluster that does not share the data directory) exits 2 with its reason on a last log
# line after this prefix; the client that started it shows that reason to the user.
CANNOT_START = "engine: cannot start: "


class ProtocolError(ValueError):
    """A line that is not one of the protocol's messages."""


# ---------------------------------------------------------------------------
# Where the engine lives: <home>/engine/ (0700)


def engine_dir(home: os.PathLike | str) -> Path:
    return Path(home) / "engine"


def socket_path(home: os.PathLike | str) -> Path:
    return engine_dir(home) / "engine.sock"


def pid_path(home: os.PathLike | str) -> Path:
    return engine_dir(home) / "engine.pid"


def log_path(home: os.PathLike | str) -> Path:
    return engine_dir(home) / "engine.log"


def lock_path(home: os.PathLike | str) -> Path:
    return engine_dir(home) / "engine.lock"


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """An address for bind/connect.  Unix socket paths are limited to ~108 bytes, so a
    deep home is reached through /proc/self/fd/<dir> on Linux."""
    if len(os.fsencode(path)) < 100 or not sys.platform.startswith("linux"):
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Encoding


def encode(message: "Message | dict") -> bytes:
    """One message as one JSON line."""
    obj = message.to_wire() if isinstance(message, Message) else message
    return json_line(obj)


def decode(line: bytes | str) -> dict:
    """One JSON line as a dict; ProtocolError if it is not a JSON object."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------
# Messages


class Message:
    """A dataclass that crosses a pipe or socket.

    TAG/NAME: tagged messages carry {TAG: NAME} ("op" for requests and worker
    commands, "msg" for the worker's messages); answers are untagged, since the
    request says what comes back.  Unknown fields are ignored, so either side may
    add one without breaking the other."""

    TAG: ClassVar[str | None] = None
    NAME: ClassVar[str | None] = None

    def to_wire(self) -> dict:
        obj = {self.TAG: self.NAME} if self.TAG else {}
        for f in fields(self):
            value = getattr(self, f.name)
            obj[f.name] = value.to_wire() if isinstance(value, Message) else value
        return obj

    @classmethod
    def from_wire(cls, obj: Any):
        if not isinstance(obj, dict):
            raise ProtocolError(f"{cls.__name__}: expected a JSON object, got {type(obj).__name__}")
        if cls.TAG and obj.get(cls.TAG) != cls.NAME:
            raise ProtocolError(f"{cls.__name__}: expected {cls.TAG}={cls.NAME!r}, got {obj.get(cls.TAG)!r}")
        hints = _hints(cls)
        values = {}
        for f in fields(cls):
            if f.name not in obj:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ProtocolError(f"{cls.__name__}: missing field {f.name!r}")
                continue
            values[f.name] = _checked(cls.__name__, f.name, obj[f.name], hints[f.name])
        return cls(**values)


def _hints(cls) -> dict:
    cached = cls.__dict__.get("_hints_cache")
    if cached is None:
        cached = typing.get_type_hints(cls)
        cls._hints_cache = cached
    return cached


def _checked(owner: str, name: str, value: Any, hint: Any) -> Any:
    """`value` if it has the JSON shape `hint` names (nested messages are built), else ProtocolError."""
    if isinstance(hint, type) and issubclass(hint, Message):
        return hint.from_wire(value)
    message = _optional_message(hint)
    if message is not None:
        return None if value is None else message.from_wire(value)
    if _conforms(value, hint):
        return value
    raise ProtocolError(f"{owner}.{name}: {value!r} is not {_describe(hint)}")


def _optional_message(hint: Any) -> type[Message] | None:
    """M for a hint `M | None` where M is a Message; else None."""
    if typing.get_origin(hint) not in (Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], Message):
        return args[0]
    return None


def _conforms(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# -- client -> server requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ping(Message):
    TAG, NAME = "op", "ping"


@dataclass(frozen=True)
class Status(Message):
    """device=True: probe the device now (never by starting a worker); False: the last known one."""

    TAG, NAME = "op", "status"
    device: bool = True


@dataclass(frozen=True)
class Submit(Message):
    """A new job (kind, concept, params), or `resume` an existing run (params merged into its own)."""

    TAG, NAME = "op", "submit"
    kind: str | None = None
    concept: str | None = None
    params: dict | None = None
    resume: str | None = None


@dataclass(frozen=True)
class Cancel(Message):
    TAG, NAME = "op", "cancel"
    run_id: str


@dataclass(frozen=True)
class Jobs(Message):
    TAG, NAME = "op", "jobs"


@dataclass(frozen=True)
class Subscribe(Message):
    """Replay the run's events with seq > after_seq, then (follow) live ones until it ends."""

    TAG, NAME = "op", "subscribe"
    run_id: str
    after_seq: int = 0
    follow: bool = True


@dataclass(frozen=True)
class Stop(Message):
    """Stop the engine; force: even with jobs queued or running (they become interrupted)."""

    TAG, NAME = "op", "stop"
    force: bool = False


REQUESTS: dict[str, type[Message]] = {cls.NAME: cls for cls in (Ping, Status, Submit, Cancel, Jobs, Subscribe, Stop)}


def parse_request(obj: dict) -> Message:
    """The request `obj` names by its "op"; ProtocolError for an unknown op or a bad field."""
    return _parse(REQUESTS, "op", obj)


def _parse(known: dict[str, type[Message]], tag: str, obj: dict) -> Message:
    cls = known.get(obj.get(tag))
    if cls is None:
        raise ProtocolError(f"unknown {tag} {obj.get(tag)!r}; known: {', '.join(known)}")
    return cls.from_wire(obj)


# -- server -> client answers ----------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorAnswer(Message):
    error: str
    user: bool = False


@dataclass(frozen=True)
class PingAnswer(Message):
    pid: int
    version: str
    protocol: int = PROTOCOL
    ok: bool = True


@dataclass(frozen=True)
class StatusAnswer(Message):
    """What the engine is doing.

    `workers` is the engine's picture, one entry per worker (one per device; on Ray, one per
    Ray actor), in a fixed order.  Each is a dict (read keys with .get: more may come):

        worker       int         its place in the list (0 …), stable while the engine runs
        device       str         "cuda:1", "cpu" … as TISTUDIO_DEVICES names it; on Ray the
                                 device inside the actor ("cuda:0" there) once it has said
        backend      str         "local" (a child process) or "ray" (a Ray actor)
        node         str | None  the Ray node's address (None for local workers)
        pid          int | None  the worker's process, None while there is none (it starts
                                 with its first job)
        state        str         "idle", "starting" (its process is starting for a job),
                                 "running", or "none" (no process yet)
        job          str | None  the run id it is running (a split sweep: the sweep's id)
        kind, concept            that job's kind and concept
        members      list | None the sweep members this worker trains, when it trains a group
        step, steps  int | None  its latest step event (for a sweep group: its first member)
        steps_per_s  float|None  from that step event
        name         str | None  the GPU's name
        memory       dict        bytes, each key present when known: vram_total,
                                 vram_used_device (the whole device, every process),
                                 vram_allocated, vram_reserved, vram_peak (this worker's
                                 torch; the peak since its job began); rss (the worker
                                 process's resident memory, Linux)
        source       str | None  where the device figures came from ("worker": its torch,
                                 "nvidia-smi", "driver", "engine" (assigned, nothing to
                                 measure: a CPU), "probe", "ray")
        torch, gpus, note, error   present when the probe says them: torch's version (an
                                 idle worker that loaded it), GPUs visible, what is off
        held         dict        present when an idle worker said it: what it keeps between
                                 jobs, {"model": spec, "dtype": "float16" …, "compiled_unet":
                                 {"mode", "batch", "resolution", "low_vram"} (only when held)}

    The older single-device fields stay for old clients: `running` is the first running job's
    summary (None when idle), `worker_pid` the first worker's pid, `device` the first
    worker's device ({"device": "cuda:0" | "cpu" …, "source": …, vram figures}).
    `backend` says how jobs are run: {"kind": "local", "devices": [...]} or {"kind": "ray",
    "address": …, "workers": N}.  `environment` is the variables the workers inherit that
    change what they do, `storage` whether the engine can write to its home."""

    pid: int
    version: str
    home: str
    started: float
    uptime: float
    queue: int
    queued: list[str]
    running: dict | None
    worker_pid: int | None
    device: dict
    clients: int
    idle_seconds: float
    environment: dict = field(default_factory=dict)
    storage: dict = field(default_factory=dict)
    workers: list[dict] = field(default_factory=list)
    backend: dict = field(default_factory=dict)
    protocol: int = PROTOCOL


@dataclass(frozen=True)
class SubmitAnswer(Message):
    run_id: str
    run_dir: str
    position: int


@dataclass(frozen=True)
class CancelAnswer(Message):
    status: str  # "cancelled" (it was queued) or "cancelling" (its worker was told)
    ok: bool = True


@dataclass(frozen=True)
class JobsAnswer(Message):
    """Every run (oldest first): its run.json fields plus run_dir and queue position, with the
    engine's in-memory status laid over what the disk says.  `running` is the first running
    job (old clients), `running_jobs` every one, in the order they started."""

    jobs: list[dict]
    queue: list[str]
    running: str | None
    storage: dict = field(default_factory=dict)
    running_jobs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StopAnswer(Message):
    ok: bool = True


@dataclass(frozen=True)
class EventBatch(Message):
    """Part of a subscription: run events in seq order."""

    events: list[dict]


@dataclass(frozen=True)
class StreamEnd(Message):
    """The last line of a subscription: the run's status as the engine knows it and `reason`,
    the run's error if it has one (not named "error": a line with an "error" key is an
    ErrorAnswer).  `unsaved` says why the run's log may lack that status: the disk refused
    the write, and the engine holds it in memory until it can write it."""

    status: str | None
    reason: str | None = None
    unsaved: str | None = None
    end: bool = True


# -- server -> worker commands ---------------------------------------------------------------------


@dataclass(frozen=True)
class SweepGroup(Message):
    """One part of a sweep split over several workers (engine.server.placement), each part still
    batched.  Group 0 leads: it alone writes the sweep's own run.json and log; the others
    write only their members'.  `members` None (the sweep's first attempt): the lead makes
    every member, the others wait for them in the sweep's run.json; then each trains its
    group of `count` (engine.store.sweeps.chunk)."""

    index: int
    count: int
    members: list[str] | None = None


@dataclass(frozen=True)
class JobSpec(Message):
    """What a worker needs to run one job (`group`: only that part of a split sweep; a job
    with a group never writes its own final status: the server does, once every group ended)."""

    run_id: str
    run_dir: str
    kind: str
    concept: str | None = None
    params: dict = field(default_factory=dict)
    resumed: bool = False
    attempts: int = 0
    group: SweepGroup | None = None


@dataclass(frozen=True)
class RunJob(Message):
    TAG, NAME = "op", "run"
    job: JobSpec


@dataclass(frozen=True)
class CancelJob(Message):
    TAG, NAME = "op", "cancel"
    run_id: str


@dataclass(frozen=True)
class ProbeDevice(Message):
    """Ask the worker what torch sees (it answers None unless torch is already loaded)."""

    TAG, NAME = "op", "probe"


WORKER_COMMANDS: dict[str, type[Message]] = {cls.NAME: cls for cls in (RunJob, CancelJob, ProbeDevice)}


def parse_worker_command(obj: dict) -> Message:
    return _parse(WORKER_COMMANDS, "op", obj)


# -- worker -> server messages ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hello(Message):
    TAG, NAME = "msg", "hello"
    pid: int


@dataclass(frozen=True)
class Event(Message):
    """A record the worker has appended to the run's events.jsonl (it carries its seq)."""

    TAG, NAME = "msg", "event"
    run_id: str
    event: dict


@dataclass(frozen=True)
class Progress(Message):
    """step/steps, plus run.json fields a handler set (embedding, model …), flat on the wire."""

    TAG, NAME = "msg", "progress"
    run_id: str
    step: int | None = None
    steps: int | None = None
    fields: dict = field(default_factory=dict)

    def to_wire(self) -> dict:
        obj = {**self.fields, "msg": self.NAME, "run_id": self.run_id}
        obj.update({k: v for k, v in (("step", self.step), ("steps", self.steps)) if v is not None})
        return obj

    @classmethod
    def from_wire(cls, obj: Any) -> "Progress":
        base = super().from_wire({k: v for k, v in obj.items() if k != "fields"} if isinstance(obj, dict) else obj)
        extra = {k: v for k, v in obj.items() if k not in ("msg", "run_id", "step", "steps")}
        return cls(base.run_id, base.step, base.steps, extra)


@dataclass(frozen=True)
class Finished(Message):
    """The job is over.  `unsaved` names why its final status could not be written (a full
    disk); the server then keeps the status in memory and writes it when it can."""

    TAG, NAME = "msg", "finished"
    run_id: str
    status: str
    error: str | None = None
    unsaved: str | None = None


@dataclass(frozen=True)
class DeviceReport(Message):
    TAG, NAME = "msg", "device"
    device: dict | None


WORKER_MESSAGES: dict[str, type[Message]] = {
    cls.NAME: cls for cls in (Hello, Event, Progress, Finished, DeviceReport)
}


def parse_worker_message(obj: dict) -> Message:
    return _parse(WORKER_MESSAGES, "msg", obj)
