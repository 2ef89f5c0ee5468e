"""Every message the studio passes around, typed.

    EngineBridge ──posts──▶ App          what the engine said or did (bridge messages below)
    App ──`changed` signal──▶ screens    what in `StudioState` or on disk changed (StudioChange)

The App folds a bridge message into `StudioState` and then publishes the StudioChange
kinds that tell the screens what to redraw.  A screen collects them between redraws
in a `Changes` and asks it, e.g. `changes.any(LibraryChanged)` or
`changes.of(RunSubmitted)`.  The App→screen changes go out on a Signal rather than
with `post_message` because every subscriber, also a screen not on top, needs each one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypeVar

from textual.message import Message

EngineState = Literal["offline", "starting", "online", "lost", "failed", "disabled"]
CliCommand = Literal["import", "export"]  # `tistudio …` subprocesses the studio runs
Severity = Literal["information", "warning", "error"]


# ---------------------------------------------------------------------------
# EngineBridge → App


@dataclass
class EngineStateChanged(Message):
    """The connection to the engine changed (`detail`: a line for the status bar or help)."""

    state: EngineState
    detail: str = ""


@dataclass
class EngineSnapshot(Message):
    """A poll's answer: the engine's status (None: not asked this time) and every run
    record (None: not asked this time)."""

    status: dict | None
    jobs: list[dict] | None


@dataclass
class RunEvents(Message):
    """A batch of a run's events; `ended`: its event stream is over (the run is final)."""

    run_id: str
    events: list[dict]
    ended: bool = False


@dataclass
class JobSubmitted(Message):
    """The engine queued a job (or resumed a run) that `origin`, a screen's mode, asked for."""

    run_id: str
    kind: str | None
    concept: str | None
    origin: str | None
    resumed: bool = False


@dataclass
class BridgeNotice(Message):
    """Something to tell the user: a notification, or a dialog when `details` are worth reading."""

    text: str
    severity: Severity = "error"
    title: str = ""
    details: str = ""


@dataclass
class CommandFinished(Message):
    """A `tistudio …` subprocess (import, export) ended."""

    command: CliCommand
    returncode: int
    stdout: str
    stderr: str


# ---------------------------------------------------------------------------
# App → screens (published on `StudioApp.changed`)


@dataclass(unsafe_hash=True)
class StudioChange(Message, bubble=False):
    """Something the screens draw from changed.  Equal changes are one change (hashable by
    their fields), so a screen that is not shown collects each kind once, not once per event.
    They never bubble: a screen handles its own."""

    def __init_subclass__(cls, bubble: bool | None = False, **kwargs) -> None:
        super().__init_subclass__(bubble=bubble, **kwargs)


@dataclass(unsafe_hash=True)
class EngineChanged(StudioChange):
    """The engine's connection state (`StudioState.engine`)."""


@dataclass(unsafe_hash=True)
class StatusChanged(StudioChange):
    """The engine's status: device, VRAM (`StudioState.status`)."""


@dataclass(unsafe_hash=True)
class JobsChanged(StudioChange):
    """The run records (`StudioState.jobs`)."""


@dataclass(unsafe_hash=True)
class RunChanged(StudioChange):
    """New events in a run's track (`StudioState.tracks[run_id]`)."""

    run_id: str


@dataclass(unsafe_hash=True)
class RunSubmitted(StudioChange):
    """A job this studio asked for was queued; `origin` is the mode of the screen that asked."""

    run_id: str
    kind: str | None
    origin: str | None


@dataclass(unsafe_hash=True)
class LibraryChanged(StudioChange):
    """Concepts, their images or their runs on disk."""


@dataclass(unsafe_hash=True)
class MetricsChanged(StudioChange):
    """An evaluation or experiment finished: tables and curves on disk."""


@dataclass(unsafe_hash=True)
class TokenizerReady(StudioChange):
    """`StudioApp.tokenizer` is loaded: initializers can be checked live."""


@dataclass(unsafe_hash=True)
class ImagesChanged(StudioChange):
    """Another image protocol: every image is drawn again."""


ChangeT = TypeVar("ChangeT", bound=StudioChange)


@dataclass
class Changes:
    """The changes a screen collected since it last drew; `everything` when it must draw
    it all (its first draw, or being shown again)."""

    items: set[StudioChange] = field(default_factory=set)
    everything: bool = False

    def any(self, *kinds: type[StudioChange]) -> bool:
        """True if one of `kinds` changed (always, when drawing everything)."""
        return self.everything or any(isinstance(change, kinds) for change in self.items)

    def of(self, kind: type[ChangeT]) -> list[ChangeT]:
        """The changes of one kind (those that carry data: which run, who submitted it)."""
        return [change for change in self.items if isinstance(change, kind)]
