"""What every main screen shares: the navigation line, the status bar, the footer, and a
throttled redraw driven by the App's `changed` signal: the typed changes
(tistudio.messages) that arrive between two redraws are handed to `redraw` together."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container
from textual.screen import Screen
from textual.widgets import Input

from engine.errors import one_line
from tistudio.messages import Changes, ImagesChanged, StudioChange
from tistudio.widgets.footer import StudioFooter
from tistudio.widgets.statusbar import NavBar, StatusBar

REDRAW_SECONDS = 0.25  # at most four redraws a second, however fast events arrive


class StudioScreen(Screen):
    MODE = ""  # the App mode this screen is (library, train, generate, metrics, gallery)
    HOME_FOCUS: str | None = None  # where Escape sends the focus from a text field
    BINDINGS = [Binding("escape", "leave_field", "Leave field", show=False)]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dirty: set[StudioChange] = set()

    def compose(self) -> ComposeResult:
        yield NavBar(self.MODE, id="nav")
        with Container(id="body"):
            yield from self.compose_body()
        yield StatusBar(id="status")
        yield StudioFooter()

    def compose_body(self) -> ComposeResult:  # pragma: no cover - overridden
        yield from ()

    def on_mount(self) -> None:
        self.app.changed.subscribe(self, self._on_changed)
        self.set_interval(REDRAW_SECONDS, self._tick, name=f"{self.MODE}-redraw")
        self._update(Changes(everything=True))

    def on_screen_resume(self) -> None:
        dirty, self._dirty = self._dirty, set()
        self._update(Changes(dirty, everything=True))

    def _on_changed(self, change: StudioChange) -> None:
        self._dirty.add(change)

    def _tick(self) -> None:
        if self._dirty and self.is_current:
            dirty, self._dirty = self._dirty, set()
            self._update(Changes(dirty))

    def _update(self, changes: Changes) -> None:
        try:
            self.redraw(changes)
        except Exception as exc:  # noqa: BLE001 - odd data on disk must not take the studio down
            message = f"could not draw the {self.MODE} screen: {type(exc).__name__}: {one_line(exc)}"
            if message != getattr(self, "_last_problem", None):
                self._last_problem = message
                self.notify(message, severity="error")
        if changes.of(ImagesChanged):  # another image protocol: draw every image again with it
            from tistudio.widgets.images import ImagePreview

            for preview in self.query(ImagePreview):
                self.run_worker(preview.reload(), group="reload-images")

    def redraw(self, changes: Changes) -> None:
        """Bring the screen up to date with the App's state; `changes` says what changed."""

    def sync_concept_select(self, select, shown: tuple) -> tuple:
        """Keep a concept picker in step with the library and the app's selected concept;
        returns the names now shown."""
        from textual.widgets import Select

        names = self.app.library.names()
        if names != shown:
            select.set_options([(n, n) for n in names])
        wanted = self.app.selected_concept
        if wanted in names and select.value != wanted:
            select.value = wanted
        elif select.value is Select.NULL and names:
            select.value = names[0]
        return names

    def refuse_form(self, exc: ValueError, title: str) -> None:
        """A form value the engine refuses: its message as a notification and on the field it is
        about (marked invalid, focused, the message as its tooltip, until the next edit)."""
        for widget in self.query(".-refused"):
            widget.remove_class("-refused")
            widget.tooltip = None
        field = getattr(exc, "field", None)
        if field and self.query(f"#{field}"):
            widget = self.query_one(f"#{field}")
            widget.add_class("-refused")
            widget.tooltip = str(exc)
            self.set_focus(widget)
            if hasattr(widget, "scroll_visible"):
                widget.scroll_visible(animate=False)
        self.notify(str(exc), severity="error", title=title)

    def clear_refused(self, widget) -> None:
        if widget.has_class("-refused"):
            widget.remove_class("-refused")
            widget.tooltip = None

    def on_input_changed(self, event: Input.Changed) -> None:
        self.clear_refused(event.input)

    def action_leave_field(self) -> None:
        """Escape in a text field gives the keys (1-5, letters) back to the screen."""
        if isinstance(self.focused, Input):
            self.set_focus(self.query_one(self.HOME_FOCUS) if self.HOME_FOCUS else None)
