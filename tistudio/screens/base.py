"""What every main screen shares: the navigation line, the status bar, the footer, and a
throttled redraw driven by the App's `changed` signal."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container
from textual.screen import Screen
from textual.widgets import Footer, Input

from tistudio.widgets.statusbar import NavBar, StatusBar

REDRAW_SECONDS = 0.25  # at most four redraws a second, however fast events arrive


class StudioScreen(Screen):
    MODE = ""
    TITLE_TEXT = ""
    BINDINGS = [Binding("escape", "leave_field", "Leave field", show=False)]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dirty: set[str] = set()

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE, id="nav")
        with Container(id="body"):
            yield from self.compose_body()
        yield StatusBar(id="status")
        yield Footer()

    def compose_body(self) -> ComposeResult:  # pragma: no cover - overridden
        yield from ()

    def on_mount(self) -> None:
        self.app.changed.subscribe(self, self._on_changed)
        self.set_interval(REDRAW_SECONDS, self._tick, name=f"{self.MODE}-redraw")
        self.redraw(set(("all",)))

    def on_screen_resume(self) -> None:
        self.redraw(set(("all",)) | self._dirty)
        self._dirty.clear()

    def _on_changed(self, what: str) -> None:
        self._dirty.add(what)

    def _tick(self) -> None:
        if self._dirty and self.is_current:
            dirty, self._dirty = self._dirty, set()
            self.redraw(dirty)

    def redraw(self, what: set[str]) -> None:
        """Bring the screen up to date with the App's state; `what` says what changed."""

    def action_leave_field(self) -> None:
        """Escape in a text field gives the keys (1-4, letters) back to the screen."""
        if isinstance(self.focused, Input):
            self.set_focus(self.query_one(self.HOME_FOCUS) if self.HOME_FOCUS else None)

    HOME_FOCUS: str | None = None

    @property
    def studio(self):
        return self.app
