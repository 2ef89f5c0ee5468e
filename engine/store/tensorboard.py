"""A run's history as TensorBoard event files (the optional `tensorboard` extra).

Every peer writes TensorBoard logs and people compare runs there, so a run's event log
(engine.store.events) is turned into TensorBoard's records, under ``DIR/<run id>/`` so that
``tensorboard --logdir DIR`` shows the runs side by side:

    train/loss, train/lr        every `step` event (the run's logging interval)
    train/reg                   the regulariser's penalty, when the run has one
    vector/norm, vector/cos_init    the word's mean vector norm and cosine to where it started
                                (text encoder 1; SDXL's second: vector/norm_2, vector/cos_init_2)
    probe/<figure>              every number of a `probe` event (reconstruction, editability …)
    preview                     the PNG each `preview` event names, at its step

A sweep's (or an experiment's) member runs each get their own folder.  `export_run` writes
a run's whole history at once; `LiveBoard` writes records as a followed run's events arrive
(`tistudio train --tensorboard`).  Both use TensorBoard's own writer and protocol buffers,
which need neither torch nor TensorFlow; the package is imported only when asked for, and
its absence is one line naming the extra.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError
from engine.store.runs import FINAL, Run

INSTALL = "pip install 'tistudio[tensorboard]'"
EVENT_FILE_MARK = "tfevents"  # TensorBoard reads every file whose name holds this
# step-event fields -> tags; a list field gives one tag per text encoder (the first keeps the plain name)
SCALARS = {"loss": "train/loss", "lr": "train/lr", "reg": "train/reg"}
PER_ENCODER = {"norms": ("norm", "vector/norm"), "cos_inits": ("cos_init", "vector/cos_init")}
_PROBE_SKIP = {"type", "seq", "t", "step", "steps", "run"}


def require_tensorboard(root: os.PathLike | str | None = None) -> None:
    """UserError (one line) unless the tensorboard package can be imported and `root` (when
    given) can become a folder of event files; checks only, writes nothing."""
    _writer_class()
    if root is None:
        return
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"--tensorboard {root}: a file, not a folder; give a folder for the event files")
    existing = next(p for p in (root, *root.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--tensorboard {root}: {existing} is not writable; give a folder you can write")


def _writer_class():
    try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise UserError(f"--tensorboard needs the tensorboard package; install it with {INSTALL}") from None
    return EventFileWriter


@dataclass(frozen=True)
class Record:
    """One TensorBoard value: a scalar (`value`), or a PNG image (`image`: read when written, so a
    long run's previews are not all held at once)."""

    tag: str
    step: int
    wall_time: float
    value: float | None = None
    image: Path | None = None


def records(event: dict, run_dir: Path | None = None) -> list[Record]:
    """The TensorBoard records one run event gives (none for events that carry no figure).
    run_dir: where to look for a preview whose recorded path is gone (a data directory moved)."""
    kind, step = event.get("type"), event.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return []
    wall = float(event.get("t") or 0.0)
    if kind == "step":
        return _step_records(event, step, wall)
    if kind == "probe":
        return [Record(f"probe/{key}", step, wall, float(value)) for key, value in event.items()
                if key not in _PROBE_SKIP and _number(value)]
    if kind == "preview":
        image = _preview(event.get("path"), run_dir)
        return [Record("preview", step, wall, image=image)] if image else []
    return []


def _step_records(event: dict, step: int, wall: float) -> list[Record]:
    found = [Record(tag, step, wall, float(event[key])) for key, tag in SCALARS.items() if _number(event.get(key))]
    for key, (single, tag) in PER_ENCODER.items():
        values = event.get(key) if isinstance(event.get(key), list) else [event.get(single)]
        for index, value in enumerate(values):
            if _number(value):
                found.append(Record(tag if index == 0 else f"{tag}_{index + 1}", step, wall, float(value)))
    return found


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _preview(path, run_dir: Path | None) -> Path | None:
    """Where a preview's PNG is; None when it is gone (a run folder copied without them)."""
    if not isinstance(path, str):
        return None
    found = Path(path)
    if not found.is_file() and run_dir is not None:
        found = Path(run_dir) / "previews" / found.name
    return found if found.is_file() else None


def _png(path: Path) -> tuple[bytes, int, int, int] | None:
    """A PNG's bytes, width, height and channels; None when it cannot be read."""
    from PIL import Image

    try:
        data = path.read_bytes()
        with Image.open(path) as image:
            return data, image.width, image.height, len(image.getbands())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- writing


class _EventFile:
    """One TensorBoard event file in `folder`, written with TensorBoard's own writer."""

    def __init__(self, folder: Path, flush_secs: float = 120):
        from tensorboard.compat.proto import event_pb2, summary_pb2

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self._writer = _writer_class()(str(folder), flush_secs=flush_secs)

    def write(self, record: Record) -> None:
        if record.image is not None:
            found = _png(record.image)
            if found is None:
                return  # removed since its event was read
            data, width, height, channels = found
            image = self._summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=data)
            value = self._summary.Value(tag=record.tag, image=image)
        else:
            value = self._summary.Value(tag=record.tag, simple_value=record.value)
        summary = self._summary(value=[value])
        self._writer.add_event(self._event(wall_time=record.wall_time, step=record.step, summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def settled(events: list[dict], run_dir: Path | None = None) -> list[Record]:
    """A whole log's records: one per tag and step, the last one logged (a resumed run logs again
    the steps after its checkpoint; the resumed values are the run's), in step order."""
    latest: dict[tuple[str, int], Record] = {}
    for event in events:
        for record in records(event, run_dir):
            latest[(record.tag, record.step)] = record
    return sorted(latest.values(), key=lambda r: (r.step, r.tag))


def export_run(home: os.PathLike | str, run_id: str, root: os.PathLike | str) -> list[Path]:
    """Write run `run_id`'s history (each member's, for a sweep) to `root`/<run id>/; return the
    folders written.  Each replaces what an earlier export or follow wrote there, and appears
    whole or not at all."""
    _writer_class()
    run = Run.find(home, run_id)
    runs = [Run.find(home, member) for member in run.members] or [run]
    trained = [(r, r.events()) for r in runs]
    trained = [(r, events) for r, events in trained if any(e.get("type") == "step" for e in events)]
    if not trained:
        raise UserError(f"run {run_id} ({run.kind}) has no training steps to export; "
                        "give a train or sweep run (`tistudio runs` lists them)")
    root = _checked_root(root)
    return [_replace(root / r.id, settled(events, r.dir)) for r, events in trained]


def _checked_root(root: os.PathLike | str) -> Path:
    require_tensorboard(root)
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--tensorboard {root}: cannot make the folder ({exc.strerror or exc}); "
                        "give a folder you can write") from None
    return root


def _replace(folder: Path, found: list[Record]) -> Path:
    """Write `found` to a new event file beside `folder`, then swap it in for the event files there."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        events = _EventFile(staging)
        try:
            for record in found:
                events.write(record)
        finally:
            events.close()
        (written,) = [p for p in staging.iterdir() if EVENT_FILE_MARK in p.name]
        folder.mkdir(exist_ok=True)
        stale = _event_files(folder)
        os.replace(written, folder / written.name)
        for path in stale:
            path.unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _event_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and EVENT_FILE_MARK in p.name]


class LiveBoard:
    """TensorBoard records written as a followed run's events arrive.

    The follower replays the run's history from its first event, so the board starts each run's
    folder afresh (its earlier event files go).  A sweep streams its first member's steps (events
    with a `run`): each lands in that member's folder.  When the run has ended, `close` writes the
    whole history again with `export_run`: every member of a sweep, each step once."""

    def __init__(self, root: os.PathLike | str, run_id: str, home: os.PathLike | str, flush_secs: float = 2):
        self.root, self.run_id, self.home = _checked_root(root), run_id, Path(home)
        self.flush_secs = flush_secs
        self._files: dict[str, _EventFile] = {}

    def add(self, event: dict) -> None:
        found = records(event)
        if not found:
            return
        events = self._file(str(event.get("run") or self.run_id))
        for record in found:
            events.write(record)

    def _file(self, run_id: str) -> _EventFile:
        if run_id not in self._files:
            folder = self.root / run_id
            folder.mkdir(exist_ok=True)
            for path in _event_files(folder):
                path.unlink(missing_ok=True)
            self._files[run_id] = _EventFile(folder, self.flush_secs)
        return self._files[run_id]

    def flush(self) -> None:
        """Put what is written so far on disk now (the writer's thread does it every `flush_secs`)."""
        for events in self._files.values():
            events.flush()

    def close(self, status: str | None) -> list[Path]:
        """Close the files; a run that has ended (`status` final) is written whole once more."""
        for events in self._files.values():
            events.close()
        self._files.clear()
        if status not in FINAL:
            return []
        with contextlib.suppress(UserError):  # nothing trained (failed before its first step)
            return export_run(self.home, self.run_id, self.root)
        return []
