"""The job model: a job spec becomes a run directory with `run.json` and `events.jsonl`.

    <home>/concepts/<concept>/runs/<run-id>/   a job about a concept (train, eval …)
    <home>/jobs/<run-id>/                      a job without a concept

`run.json` is the run's current state (rewritten atomically); `events.jsonl` is
its history and the source of truth a late client replays.  Exactly one process
writes a run at a time: the engine server while the run is queued or after its
worker died, the worker while the run is running.  Nothing here imports torch.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.store.paths import atomic_write_json, ensure_private_dir, read_json

ACTIVE = frozenset({"queued", "running"})
FINAL = frozenset({"done", "failed", "cancelled", "interrupted"})
STATUSES = ACTIVE | FINAL

# Keys of run.json that only the job machinery may set (never a handler's set_progress).
RESERVED_FIELDS = frozenset({"id", "kind", "concept", "params", "status", "pid", "created", "started", "finished"})
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------
# The event log


class EventLog:
    """An append-only JSON-lines file whose records carry a `seq` numbered from 1.

    Each record is written by a single `os.write` on an O_APPEND descriptor, so a
    reader sees whole lines or nothing; a trailing partial line (a writer killed
    mid-write, a full disk) is ignored by `read` and fenced off by the next append.
    A write the disk cut short raises OSError(ENOSPC) and does not use up its seq.
    One writer at a time: the seq counter is taken from the file when the first
    append of this instance happens, so a resumed run continues its numbering.
    """

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self._fd: int | None = None
        self._seq: int | None = None
        self._fence = False  # our last write was cut short: start the next on a fresh line
        self._lock = threading.Lock()  # handlers may emit from their own threads

    def append(self, event: dict) -> dict:
        """Write `event` with `seq` and `t` filled in; return the record as written."""
        with self._lock:
            if self._fd is None:
                self._open()
            if self._fence:
                _write_all(self._fd, b"\n")
                self._fence = False
            record = {"seq": self._seq + 1, "t": round(time.time(), 3), **_without(event, ("seq", "t"))}
            line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode("utf-8")
            try:
                _write_all(self._fd, line)
            except OSError:
                self._fence = True  # part of the line may be on disk; readers skip it once fenced
                raise
            self._seq += 1
            return record

    def read(self, after_seq: int = 0) -> list[dict]:
        """All complete records with seq > after_seq, in order."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        records = parse_lines(data)
        if after_seq:
            records = [r for r in records if r.get("seq", 0) > after_seq]
        return records

    def last_seq(self) -> int:
        if self._seq is not None:
            return self._seq
        return _scan_last_seq(self.path)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                self._seq = None

    def _open(self) -> None:
        ensure_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size and _last_byte(self.path) != b"\n":
                _write_all(fd, b"\n")  # fence off a partial line so our first record parses
            self._seq = _scan_last_seq(self.path)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def __del__(self):  # pragma: no cover - best effort
        if self._fd is not None:
            os.close(self._fd)


def _write_all(fd: int, data: bytes) -> None:
    """One os.write; a short one (the disk filled mid-line) is an error, not a silent truncation."""
    if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, "No space left on device (a short write)")


def parse_lines(data: bytes) -> list[dict]:
    """Parse complete JSON lines; drop a trailing partial line and any unreadable line."""
    end = data.rfind(b"\n")
    if end < 0:
        return []
    body = data[:end]
    # JSON strings never hold a raw newline, so the lines form a JSON array once joined
    # with commas: one C-level parse instead of 100k Python-level ones.
    try:
        records = json.loads(b"[" + body.replace(b"\n", b",") + b"]")
    except ValueError:
        records = []
        for line in body.split(b"\n"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return [r for r in records if isinstance(r, dict)]


def _scan_last_seq(path: Path) -> int:
    """The seq of the last complete record, reading the file from its end."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    chunk = 64 * 1024
    with open(path, "rb") as fh:
        while True:
            start = max(0, size - chunk)
            fh.seek(start)
            data = fh.read(size - start)
            lines = data.split(b"\n")
            if start > 0:
                lines = lines[1:]  # the first piece may be the tail of a longer line
            for line in reversed(lines):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("seq"), int):
                    return record["seq"]
            if start == 0:
                return 0
            chunk *= 4


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def _without(d: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


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
        atomic_write_json(run_dir / "run.json", _new_record(run_dir.name, kind, concept, params))
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
    return read_json(Path(run_dir) / "run.json")


def update_run(run_dir: os.PathLike | str, **fields: Any) -> dict:
    """Merge `fields` into run.json (atomic rewrite) and return the new record."""
    record = load_run(run_dir)
    record.update(fields)
    atomic_write_json(Path(run_dir) / "run.json", record)
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
    log = log or EventLog(run_dir / "events.jsonl")
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
    found = [home / "jobs" / run_id] if (home / "jobs" / run_id / "run.json").is_file() else []
    found += [p.parent for p in (home / "concepts").glob(f"*/runs/{run_id}/run.json")]
    return found


def list_runs(home: os.PathLike | str) -> list[dict]:
    """Every readable run under home (oldest first), each with its `run_dir` added."""
    home = Path(home)
    paths = list((home / "jobs").glob("*/run.json")) + list((home / "concepts").glob("*/runs/*/run.json"))
    runs = []
    for path in paths:
        try:
            record = read_json(path)
        except (OSError, ValueError):
            continue  # a run being created, or one damaged by hand: not ours to judge here
        if isinstance(record, dict) and "id" in record:
            record["run_dir"] = str(path.parent)
            runs.append(record)
    runs.sort(key=lambda r: (r.get("created") or 0, r["id"]))
    return runs


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
    for event in reversed(EventLog(Path(run_dir) / "events.jsonl").read()):
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
