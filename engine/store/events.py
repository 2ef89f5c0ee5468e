"""A run's event log: `events.jsonl`, one JSON object per line, each with a `seq` and a time.

The log is a run's history and the source of truth a late client replays.  `json_line` is the
one JSON-lines encoding of the project: the event log, the wire protocol (engine.wire.protocol)
and the CLI's `--json` progress all write their lines with it.  Nothing here imports torch.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

from engine.store.paths import ensure_private_dir

EVENTS_FILE = "events.jsonl"


def json_line(record) -> bytes:
    """`record` as one compact JSON line (UTF-8, newline-terminated; what JSON cannot hold, as text)."""
    return (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode("utf-8")


def events_path(run_dir: os.PathLike | str) -> Path:
    """Where a run's event log lives."""
    return Path(run_dir) / EVENTS_FILE



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
            line = json_line(record)
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
