"""The job model: a job spec becomes a run directory with `run.json` and `events.jsonl`.

    <home>/concepts/<concept>/runs/<run-id>/   a job about a concept (train, eval …)
    <home>/jobs/<run-id>/                      a job without a concept

`run.json` is the run's current state (rewritten atomically); `events.jsonl` is
its history and the source of truth a late client replays.  Exactly one process
writes a run at a time: the engine server while the run is queued or after its
worker died, the worker while the run is running.  Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.store.events import EVENTS_FILE, EventLog, events_path, parse_lines  # noqa: F401 (re-exported)
from engine.store.paths import atomic_write_json, ensure_private_dir, read_json

RECORD_FILE = "run.json"
ACTIVE = frozenset({"queued", "running"})
FINAL = frozenset({"done", "failed", "cancelled", "interrupted"})
STATUSES = ACTIVE | FINAL

# Keys of run.json that only the job machinery may set (never a handler's set_progress).
RESERVED_FIELDS = frozenset({"id", "kind", "concept", "params", "status", "pid", "created", "started", "finished"})
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------
# Run directories


def new_run_id() -> str:
    """UTC time then randomness: sorts by creation second, e.g. 20261126-031500-ab12."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def create_run(home: Path, spec: dict) -> Path:
    """Make the run directory for a new job and write its run.json (status queued).

    spec: {"kind": str, "concept": str | None, "params": dict}.
    """
    home = Path(home)
    kind, concept, params = _check_spec(home, spec)
    parent = home / "concepts" / concept / "runs" if concept else home / "jobs"
    ensure_private_dir(parent)
    run_dir = _claim_run_dir(home, parent)
    try:
        atomic_write_json(run_dir / RECORD_FILE, _new_record(run_dir.name, kind, concept, params))
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # a full disk must not leave a run without a record
        raise
    return run_dir


def _new_record(run_id: str, kind: str, concept: str | None, params: dict) -> dict:
    return {
        "id": run_id,
        "kind": kind,
        "concept": concept,
        "params": params,
        "status": "queued",
        "step": 0,
        "steps": None,
        "created": time.time(),
        "started": None,
        "finished": None,
        "error": None,
        "pid": None,
        "embedding": None,
        "result": None,
        "attempts": 0,
        "versions": _versions(),
    }


def _check_spec(home: Path, spec: dict) -> tuple[str, str | None, dict]:
    kind, concept, params = spec.get("kind"), spec.get("concept"), spec.get("params") or {}
    if not isinstance(kind, str) or not _SAFE_ID.match(kind):
        raise UserError(f"job kind {kind!r} is not a valid kind name")
    if not isinstance(params, dict):
        raise UserError("job params must be a JSON object")
    try:
        json.dumps(params)
    except (TypeError, ValueError) as exc:
        raise UserError(f"job params are not plain JSON: {exc}") from None
    if concept is not None:
        _check_concept(home, concept)
    return kind, concept, params


def _check_concept(home: Path, concept: Any) -> None:
    bad = (
        not isinstance(concept, str)
        or not concept
        or concept.startswith(".")
        or any(c in concept for c in "/\\\0")
        or concept in (".", "..")
    )
    if bad:
        raise UserError(f"{concept!r} is not a valid concept name")
    if not (home / "concepts" / concept / "concept.toml").is_file():
        raise UserError(f"no concept named {concept!r} in {home / 'concepts'}; create it first")


def _claim_run_dir(home: Path, parent: Path) -> Path:
    # run ids are looked up across all concepts, so they must be unique home-wide.
    for _ in range(100):
        run_id = new_run_id()
        if _run_dir_candidates(home, run_id):
            continue
        try:
            (parent / run_id).mkdir(mode=0o700)
        except FileExistsError:
            continue
        return parent / run_id
    raise RuntimeError("could not find a free run id")


def code_version() -> str:
    """The package version plus a fingerprint of the engine's source files: an engine left
    running from before an upgrade (or an edit) answers with a different one."""
    import hashlib

    digest = hashlib.sha256()
    engine_root = Path(__file__).resolve().parents[1]
    for path in sorted(engine_root.rglob("*.py")):
        st = path.stat()
        digest.update(f"{path.relative_to(engine_root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{tistudio_version()}+{digest.hexdigest()[:10]}"


def tistudio_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("tistudio")
    except metadata.PackageNotFoundError:
        return "unknown"


def _versions() -> dict:
    import platform

    return {"tistudio": tistudio_version(), "python": platform.python_version()}


def load_run(run_dir: os.PathLike | str) -> dict:
    """A run's record (its run.json) as a dict; OSError/ValueError when missing or unreadable."""
    return read_json(Path(run_dir) / RECORD_FILE)


def update_run(run_dir: os.PathLike | str, **fields: Any) -> dict:
    """Merge `fields` into run.json (atomic rewrite) and return the new record."""
    record = load_run(run_dir)
    record.update(fields)
    atomic_write_json(Path(run_dir) / RECORD_FILE, record)
    return record


def set_status(run_dir: os.PathLike | str, status: str, log: EventLog | None = None,
               error: str | None = None, **fields: Any) -> dict:
    """Record a status change: a status event first, then run.json; return the event.

    The event goes first because the log is the source of truth: if we die between
    the two writes, startup recovery adopts a final status found in the log.
    """
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    run_dir = Path(run_dir)
    own_log = log is None
    log = log or EventLog(events_path(run_dir))
    event = {"type": "status", "status": status}
    if error:
        event["error"] = error
    # `result` goes to both: a subscriber learns what the job made from the log alone.
    event.update({k: v for k, v in fields.items() if k in ("resume", "reason", "result") and v is not None})
    try:
        record = log.append(event)
    finally:
        if own_log:
            log.close()
    run_fields = {k: v for k, v in fields.items() if k not in ("resume", "reason")}
    run_fields.update(status=status, error=error)
    if status in FINAL:
        run_fields.setdefault("finished", record["t"])
        run_fields["pid"] = None
    update_run(run_dir, **run_fields)
    return record


def find_run(home: os.PathLike | str, run_id: str) -> Path:
    """The directory of run `run_id`, wherever it lives; UserError if there is none."""
    if not isinstance(run_id, str) or not _SAFE_ID.match(run_id):
        raise UserError(f"{run_id!r} is not a run id")
    found = _run_dir_candidates(Path(home), run_id)
    if not found:
        raise UserError(f"no run {run_id!r}; `tistudio runs` lists them")
    return found[0]


def _run_dir_candidates(home: Path, run_id: str) -> list[Path]:
    found = [home / "jobs" / run_id] if (home / "jobs" / run_id / RECORD_FILE).is_file() else []
    found += [p.parent for p in (home / "concepts").glob(f"*/runs/{run_id}/{RECORD_FILE}")]
    return found


def list_runs(home: os.PathLike | str) -> list[dict]:
    """Every readable run under home as plain records (`Run.as_dict`), oldest first: what the
    engine's `jobs` answer carries."""
    return [run.as_dict() for run in Run.all(home)]


# ---------------------------------------------------------------------------
# Recovery after an engine crash


def pid_alive(pid: int | None) -> bool:
    """True if `pid` is a live process (a zombie counts as dead)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def member_ids(run_dir: os.PathLike | str) -> list[str]:
    """The run ids of a sweep job's members (runs trained together in one job); [] for others."""
    try:
        return list(load_run(run_dir).get("members") or [])
    except (OSError, ValueError):
        return []


def last_status_event(run_dir: os.PathLike | str) -> dict | None:
    """The run's last status event, if any."""
    for event in reversed(EventLog(events_path(run_dir)).read()):
        if event.get("type") == "status":
            return event
    return None


def last_status(run_dir: os.PathLike | str) -> str | None:
    """The status named by the run's last status event, if any."""
    event = last_status_event(run_dir)
    return event.get("status") if event else None


def settle_run(run_dir: os.PathLike | str, status: str, error: str | None = None,
               result: dict | None = None) -> dict | None:
    """Give a run whose writer is gone (a dead worker, a job cancelled before it ran, a sweep
    whose groups have all ended) its final `status` (and `result`).  When the log already ends
    with that status (the writer died, or the disk refused, between the two writes of
    `set_status`) only run.json is brought in line with it; otherwise both are written.
    Returns the status event written, or None."""
    if status not in FINAL:
        raise ValueError(f"{status!r} is not a final status")
    logged = last_status_event(run_dir)
    if logged and logged.get("status") == status:
        extra = {"result": result} if result is not None else {}
        update_run(run_dir, status=status, error=logged.get("error", error), finished=logged.get("t"), pid=None,
                   **extra)
        return None
    return set_status(run_dir, status, error=error, result=result)


def recover_run(run_dir: os.PathLike | str, reason: str) -> str:
    """Settle a queued/running run whose process is gone: adopt a final status the log
    already holds (we died between the two writes of `set_status`), else mark it
    interrupted so the user can resume it.  Returns the status it now has."""
    logged = last_status(run_dir)
    if logged in FINAL:
        settle_run(run_dir, logged)
        return logged
    settle_run(run_dir, "interrupted", error=reason)
    return "interrupted"


# ---------------------------------------------------------------------------
# The Run type


@dataclass
class Run:
    """One run directory: its record (`run.json`) and its event log (`events.jsonl`).

    The store's one lister (`Run.all`, `Run.of_concept`: oldest first, by creation time then
    id), and the typed face of a record: the fields every reader asks for are attributes;
    `record` keeps everything run.json holds (a job kind's own fields: `result`, `config`,
    `members` …), `get` reads one of them."""

    dir: Path
    record: dict = field(default_factory=dict)

    # --- reading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, run_dir: os.PathLike | str) -> "Run":
        """The run at `run_dir`; OSError/ValueError when its record is missing or unreadable."""
        record = load_run(run_dir)
        if not isinstance(record, dict):
            raise ValueError(f"{Path(run_dir) / RECORD_FILE} is not a run record")
        return cls(Path(run_dir), record)

    @classmethod
    def find(cls, home: os.PathLike | str, run_id: str) -> "Run":
        """Run `run_id`, wherever it lives under `home`; UserError when there is none."""
        return cls.load(find_run(home, run_id))

    @classmethod
    def all(cls, home: os.PathLike | str) -> list["Run"]:
        """Every readable run under `home`: concept jobs and jobs about no concept, oldest first."""
        home = Path(home)
        return cls._gather(list((home / "jobs").glob(f"*/{RECORD_FILE}"))
                           + list((home / "concepts").glob(f"*/runs/*/{RECORD_FILE}")))

    @classmethod
    def of_concept(cls, concept_dir: os.PathLike | str) -> list["Run"]:
        """Every readable run of one concept, oldest first."""
        return cls._gather(list((Path(concept_dir) / "runs").glob(f"*/{RECORD_FILE}")))

    @classmethod
    def _gather(cls, paths: list[Path]) -> list["Run"]:
        runs = []
        for path in paths:
            try:
                run = cls.load(path.parent)
            except (OSError, ValueError):
                continue  # a run being created, or one damaged by hand: not ours to judge here
            if "id" in run.record:
                runs.append(run)
        runs.sort(key=lambda run: (run.created, run.id))
        return runs

    # --- what every reader asks ------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self.record.get(key, default)

    @property
    def id(self) -> str:
        return str(self.record.get("id") or self.dir.name)

    @property
    def kind(self) -> str:
        return self.record.get("kind") or "train"  # the oldest records have no kind: they trained

    @property
    def concept(self) -> str | None:
        return self.record.get("concept")

    @property
    def params(self) -> dict:
        params = self.record.get("params")
        return params if isinstance(params, dict) else {}

    @property
    def status(self) -> str | None:
        return self.record.get("status")

    @property
    def step(self) -> int:
        return self.record.get("step") or 0

    @property
    def steps(self) -> int | None:
        return self.record.get("steps")

    @property
    def created(self) -> float:
        """Seconds since the epoch (an ISO date in the oldest records)."""
        return created_time(self.record)

    @property
    def error(self) -> str | None:
        return self.record.get("error")

    @property
    def result(self) -> dict | None:
        result = self.record.get("result")
        return result if isinstance(result, dict) else None

    @property
    def members(self) -> list[str]:
        return list(self.record.get("members") or [])

    @property
    def parent(self) -> str | None:
        return self.record.get("parent")

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE

    @property
    def is_final(self) -> bool:
        return self.status in FINAL

    @property
    def done(self) -> bool:
        return self.status == "done"

    # --- its files ---------------------------------------------------------------------------

    @property
    def events_path(self) -> Path:
        return events_path(self.dir)

    def log(self) -> EventLog:
        return EventLog(self.events_path)

    def events(self, after_seq: int = 0) -> list[dict]:
        return self.log().read(after_seq)

    def update(self, **fields: Any) -> "Run":
        """Merge `fields` into run.json (an atomic rewrite of what is on disk now)."""
        self.record = update_run(self.dir, **fields)
        return self

    def as_dict(self) -> dict:
        """The record with its `run_dir`: what the wire and `--json` carry."""
        return {**self.record, "run_dir": str(self.dir)}


def created_time(record: dict) -> float:
    """A record's creation time in seconds (numbers; an ISO date in the oldest records; else 0)."""
    import datetime as dt

    value = record.get("created")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return dt.datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return 0.0
