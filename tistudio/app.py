"""The studio: `tistudio` with no command.

    StudioApp(home, model)      five screens as Textual modes (keys 1-5), help on ?,
                                every action in the command palette (ctrl+p)
    run_app()                   what `tistudio` runs: config → images → app

The App owns the `EngineBridge` (all engine traffic, in App-owned workers) and the
`StudioState` the screens draw from.  Bridge messages (tistudio.messages) land in the
handlers below, update the state and go out to the screens on the `changed` signal as
typed `StudioChange` messages (JobsChanged, RunChanged(run_id), RunSubmitted(run_id,
kind, origin), LibraryChanged …).

Imports no torch: nothing here or in the screens does; GPU work is the engine's.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import ModalScreen, Screen
from textual.signal import Signal

from engine.errors import one_line
from engine.store.paths import home_dir
from engine.store.runs import FINAL
from tistudio import css_cache
from tistudio.config import DEFAULT_THEME, Config
from tistudio.engine_bridge import EngineBridge
from tistudio.library_service import LibraryService
from tistudio.messages import (
    BridgeNotice,
    CommandFinished,
    EngineChanged,
    EngineSnapshot,
    EngineStateChanged,
    ImagesChanged,
    JobsChanged,
    JobSubmitted,
    LibraryChanged,
    MetricsChanged,
    RunChanged,
    RunEvents,
    RunSubmitted,
    StatusChanged,
    StudioChange,
)
from tistudio.model_reading import ModelReading, model_options
from tistudio.screens.gallery import GalleryScreen
from tistudio.screens.generate import GenerateScreen
from tistudio.screens.help import HelpScreen
from tistudio.screens.library import LibraryScreen
from tistudio.screens.metrics import MetricsScreen
from tistudio.screens.train import TrainScreen
from tistudio.state import StudioState
from tistudio.themes import load_themes, theme_dirs

css_cache.install()  # each screen's first visit would parse every widget's CSS again


class StudioApp(ModelReading, App):
    CSS_PATH = Path(__file__).parent / "studio.tcss"  # absolute: subclasses elsewhere find it too
    TITLE = "tistudio"
    MODES = {"library": LibraryScreen, "train": TrainScreen, "generate": GenerateScreen, "metrics": MetricsScreen,
             "gallery": GalleryScreen}
    DEFAULT_MODE = "library"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    BINDINGS = [
        Binding("1", "show_screen('library')", "Library", show=False),
        Binding("2", "show_screen('train')", "Train", show=False),
        Binding("3", "show_screen('generate')", "Generate", show=False),
        Binding("4", "show_screen('metrics')", "Metrics", show=False),
        Binding("5", "show_screen('gallery')", "Gallery", show=False),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit", show=False),
    ]

    def __init__(self, home: os.PathLike | str | None = None, model: str | None = None, *, engine: bool = True,
                 image_protocol: str | None = None, clip: str | None = None, eval_images: int | None = None,
                 eval_params: dict | None = None, add_sample: bool = True, config: Config | None = None,
                 theme: str | None = None, poll_seconds: float | None = None):
        """`home`/`model`: the data directory and model spec (default: --home/$TISTUDIO_HOME and
        $TISTUDIO_MODEL or builtin:tiny).  `engine=False` never starts or asks the engine (the
        studio reads the data directory alone; snapshot tests use it).  `clip`/`eval_images`:
        what evaluations use (None: the engine's defaults; tests: builtin:tiny, 2); `eval_params` go into every
        evaluation and experiment job as they are (e.g. {"sample_steps": 2}).  `theme` overrides the config's theme."""
        from engine.sd.models import resolve_spec

        super().__init__()
        self.home = home_dir(home)
        self.model = resolve_spec(model)
        self.model_options, self._options_problem = model_options()
        self.config = config or Config.load()
        self.image_protocol = image_protocol or self.config.effective_protocol()
        self.clip = clip  # None: the engine's default CLIP for the model
        self.eval_images = eval_images
        self.eval_params = dict(eval_params or {})
        self.add_sample = add_sample
        self._theme_override = theme
        self.state = StudioState()
        self.changed: Signal[StudioChange] = Signal(self, "changed")
        self.bridge = EngineBridge(self, self.home, enabled=engine,
                                   **({"poll_seconds": poll_seconds} if poll_seconds else {}))
        self.tokenizer = None
        # the studio's one door to the library on disk: screens and dialogs change it only through this
        self.library = LibraryService(self.home, lambda: self.tokenizer, self._library_written)
        self.model_family: str | None = None  # "SD 1.x", "SDXL" … once the model's configs are read
        self.model_reading = ""  # how the model predicts and why, e.g. "v_prediction, 768 px (guessed)"
        self.selected_concept: str | None = None
        self.prompt_hint: str | None = None
        self.watched: set[str] = set()  # runs a screen shows: followed until complete
        self.submitted: set[str] = set()  # runs this studio queued: their end is announced
        self._announced: set[str] = set()
        self.started_at = time.monotonic()
        self.first_screen_at: float | None = None
        self._theme_problems: list[str] = []
        self.notices: deque[tuple[str, str]] = deque(maxlen=200)  # (severity, message), newest last

    def notify(self, message: str, *, title: str = "", severity: str = "information", **kwargs) -> None:
        """Textual's notify, remembering the message (notifications vanish; tests and help keep them)."""
        self.notices.append((severity, str(message)))
        super().notify(message, title=title, severity=severity, **kwargs)

    # -- start-up

    def on_load(self) -> None:
        themes, self._theme_problems = load_themes()
        for theme in themes:
            self.register_theme(theme)
        if self.add_sample:
            from tistudio.samples import ensure_sample_concept

            try:
                added = ensure_sample_concept(self.home, model=self.model)
            except Exception:  # noqa: BLE001 - the sample is a courtesy, never a reason not to open
                added = None
            if added:
                self.selected_concept = added

    def on_mount(self) -> None:
        wanted = self._theme_override or self.config.theme
        fallback = DEFAULT_THEME if DEFAULT_THEME in self.available_themes else "textual-dark"
        self.theme = wanted if wanted in self.available_themes else fallback
        if wanted not in self.available_themes:  # say so: a silent fallback looks like a broken install
            self._theme_problems.append(
                f"theme {wanted!r} was not found in {', '.join(str(d) for d in theme_dirs())} or Textual's own; "
                f"using {self.theme} (ctrl+p lists the themes; pick one to remember it)")
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        problems = [self.config.problem, self._options_problem]
        for problem in self._theme_problems + [p for p in problems if p]:
            self.notify(problem, severity="warning", title="Settings")
        self.bridge.start()
        self._load_tokenizer()
        self.call_after_refresh(self._first_screen)

    def _first_screen(self) -> None:
        self.first_screen_at = time.monotonic()

    def _from_thread(self, callback, *args, **kwargs) -> None:
        try:
            self.call_from_thread(callback, *args, **kwargs)
        except RuntimeError:
            pass  # the app has gone meanwhile

    def _theme_changed(self, theme) -> None:
        if self.config.theme != theme.name:
            self.config.theme = theme.name
            self._save_config()

    def _save_config(self) -> None:
        try:
            self.config.save()
        except OSError as exc:
            self.notify(f"cannot save settings: {one_line(exc)}", severity="warning")

    # -- bridge messages → state → screens

    def on_engine_state_changed(self, message: EngineStateChanged) -> None:
        previous = self.state.engine
        self.state.engine, self.state.engine_detail = message.state, message.detail
        self.changed.publish(EngineChanged())
        if message.state == "online" and previous != "online":
            for run_id in list(self.watched):
                track = self.state.tracks.get(run_id)
                if track is None or not track.complete:
                    self.bridge.follow(run_id)

    def on_engine_snapshot(self, message: EngineSnapshot) -> None:
        # A poll alike the last publishes nothing (an idle engine's screens would redraw each time).
        if message.status is not None and message.status != self.state.status:
            self.state.status = message.status
            self.changed.publish(StatusChanged())
        if message.jobs is None:
            return
        jobs_changed = message.jobs != self.state.jobs
        before = {j.get("id"): j.get("status") for j in self.state.jobs}
        self.state.jobs = message.jobs
        finished_kinds = set()
        for job in message.jobs:
            old, new = before.get(job.get("id")), job.get("status")
            if old is not None and old != new and new in FINAL:
                finished_kinds.add(job.get("kind"))
                self._announce(job)
            elif old is None and new in FINAL and job.get("id") in self.submitted:
                self._announce(job)  # it ended before a poll saw it queued
            if new == "running" or (job.get("id") in self.watched and new not in FINAL):
                self.watch_run(job["id"])
        if jobs_changed:
            self.changed.publish(JobsChanged())
        if finished_kinds & {"train", "eval", "experiment"} or len(before) != len(message.jobs):
            self.changed.publish(LibraryChanged())
        if finished_kinds & {"eval", "experiment"}:
            self.changed.publish(MetricsChanged())

    def _announce(self, job: dict) -> None:
        if job.get("id") in self._announced:
            return
        self._announced.add(job.get("id"))
        status, kind = job.get("status"), job.get("kind")
        what = f"{kind} {job.get('concept') or ''} ({job.get('id')})".replace("  ", " ")
        if status == "done":
            self.notify(f"{what} finished.", title="Engine")
        elif status == "failed":
            self.notify(f"{what} failed: {job.get('error') or 'see the run'}", severity="error", title="Engine",
                        timeout=10)
        elif status == "interrupted":
            self.notify(f"{what} was interrupted: {job.get('error') or ''} (resume it on 2 Train)",
                        severity="warning", title="Engine")

    def on_run_events(self, message: RunEvents) -> None:
        track = self.state.track(message.run_id)
        was_final, was_live, was_complete = track.status in FINAL, track.live, track.complete
        changed = track.apply(message.events)
        if message.ended and track.status in FINAL:
            track.complete = True
        if not changed and track.complete == was_complete:
            # Nothing new (a running run's log read again while the engine is away): a redraw would
            # have the screen watch the run again, re-reading its log at every flush for ever.
            return
        self.changed.publish(RunChanged(message.run_id))
        if track.status in FINAL and not was_final:
            if message.run_id in self.submitted or was_live:
                self._announce({"id": message.run_id, "kind": track.kind, "concept": track.concept,
                                "status": track.status, "error": track.error})
            self.bridge.poll_now()
            self.bridge.refresh_offline()

    def on_job_submitted(self, message: JobSubmitted) -> None:
        self.watched.add(message.run_id)
        self.submitted.add(message.run_id)
        self._announced.discard(message.run_id)  # a resumed run ends again
        verb = "resumed" if message.resumed else "queued"
        what = message.kind or "run"
        self.notify(f"{what} {message.concept or ''} {verb}: {message.run_id}".replace("  ", " "), title="Engine")
        self.changed.publish(RunSubmitted(message.run_id, message.kind, message.origin or message.kind))

    def on_bridge_notice(self, message: BridgeNotice) -> None:
        if message.details:
            from tistudio.screens.modals import MessageModal

            self.push_screen(MessageModal(message.text[:1].upper() + message.text[1:], message.details))
            return
        self.notify(message.text, severity=message.severity, title=message.title or "Engine",
                    timeout=10 if message.severity == "error" else 5)

    def on_command_finished(self, message: CommandFinished) -> None:
        if message.returncode == 0:
            if message.command == "import":
                self.notify("Embedding imported.", title="Library")
                self.library_changed()
            elif message.command == "export":
                out = message.stdout.strip().splitlines()
                self.notify(f"Exported: {out[-1] if out else 'done'}", title="Library")
            return
        lines = [ln for ln in message.stderr.strip().splitlines() if ln.strip()]
        text = lines[-1] if lines else f"exit code {message.returncode}"
        self.notify(text.removeprefix("tistudio: error: "), severity="error", title=message.command.capitalize(),
                    timeout=10)

    # -- used by the screens

    def watch_run(self, run_id: str) -> None:
        """Make sure `run_id`'s events are (being) read: history, then live."""
        self.watched.add(run_id)
        track = self.state.tracks.get(run_id)
        if track is not None and track.complete:
            return
        self.bridge.follow(run_id)

    def _library_written(self) -> None:
        """The library service changed the disk: publish it on the App's thread, from any thread."""
        import threading

        if threading.get_ident() == self._thread_id:
            self.library_changed()
        else:
            self._from_thread(self.library_changed)

    def library_changed(self) -> None:
        self.changed.publish(LibraryChanged())
        self.bridge.poll_now()
        self.bridge.refresh_offline()

    def describe_settings(self) -> list[str]:
        from tistudio.palette import describe_settings

        return describe_settings(self)

    # -- actions

    def _modal_open(self) -> bool:
        return isinstance(self.screen, ModalScreen)

    def action_show_screen(self, mode: str) -> None:
        if mode not in self.MODES or self._modal_open():
            return
        if self.current_mode != mode:
            self.switch_mode(mode)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        """Leave the studio; the engine and its runs keep going."""
        await self.bridge.stop()
        self.exit()

    async def _screen_action(self, mode: str, action: str) -> None:
        if self._modal_open():
            self.pop_screen()
        if self.current_mode != mode:
            await self.switch_mode(mode)
        await self.screen.run_action(action)

    def set_image_protocol(self, protocol: str) -> None:
        from tistudio.widgets.images import setup_images

        self.config.image_protocol = protocol
        self._save_config()
        setup_images(protocol)
        self.image_protocol = protocol
        self.changed.publish(ImagesChanged())
        if protocol == "auto":
            self.notify("Images: auto — what the terminal said it supports when the studio started "
                        "(it asks again at the next start).", title="Images")
        else:
            self.notify(f"Images now use {protocol}.", title="Images")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        from tistudio.palette import system_commands

        yield from super().get_system_commands(screen)
        yield from system_commands(self)

    async def screen_action(self, mode: str, action: str) -> None:
        """Run `action` on the `mode` screen, showing it first (the palette's actions)."""
        await self._screen_action(mode, action)


def run_app(home: os.PathLike | str | None = None, model: str | None = None) -> int:
    """Open the studio in this terminal; returns the exit code."""
    from tistudio.widgets.images import setup_images

    config = Config.load()
    protocol = config.effective_protocol()
    setup_images(protocol)  # before App.run: textual-image may ask the terminal what it supports
    app = StudioApp(home, model, config=config, image_protocol=protocol)
    app.run()
    return app.return_code or 0


if __name__ == "__main__":
    raise SystemExit(run_app())
