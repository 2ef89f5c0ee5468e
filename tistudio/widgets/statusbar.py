"""The top navigation line (keys 1-5) and the bottom status bar (engine, family, device, VRAM, jobs)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tistudio.formatting import device_memory, engine_workers, fmt_bytes
from tistudio.messages import EngineChanged, JobsChanged, RunChanged, StatusChanged, StudioChange

SCREENS = (("library", "1", "Library"), ("train", "2", "Train"), ("generate", "3", "Generate"),
           ("metrics", "4", "Metrics"), ("gallery", "5", "Gallery"))

ENGINE_LABELS = {
    "online": ("●", "success", "engine: online"),
    "starting": ("◌", "warning", "engine: starting"),
    "lost": ("○", "warning", "engine: lost, reconnecting"),
    "failed": ("○", "error", "engine: not running"),
    "offline": ("○", "text-muted", "engine: offline"),
    "disabled": ("○", "text-muted", "engine: offline"),
}


class NavBar(Static):
    """`tistudio  1 Library  2 Train  3 Generate  4 Metrics  5 Gallery   ? help`; the current one highlighted."""

    DEFAULT_CSS = """
    NavBar { height: 1; width: 100%; background: $panel; color: $text-muted; }
    """

    def __init__(self, current: str, **kwargs):
        super().__init__(**kwargs)
        self.current = current

    def render(self) -> str:
        parts = ["[b $accent] tistudio [/]"]
        for mode, key, label in SCREENS:
            if mode == self.current:
                parts.append(f"[reverse $primary] {key} {label} [/]")
            else:
                parts.append(f"[@click=app.show_screen('{mode}')] [b $primary]{key}[/] {label} [/]")
        wide = self.size.width >= 90
        if wide:
            parts.append("  [@click=app.help][b $primary]?[/] help[/]  [@click=app.quit][b $primary]q[/] quit[/]")
        return " ".join(p for p in parts if p)


class StatusBar(Static):
    """One line: engine state · the model's family · device · VRAM in use · jobs running/queued.
    An engine with several workers (one per device) shows each device with its memory instead."""

    DEFAULT_CSS = """
    StatusBar { height: 1; width: 100%; background: $panel; color: $foreground; padding: 0 1;
                text-wrap: nowrap; text-overflow: ellipsis; }
    """

    _shown: Text | None = None

    def on_mount(self) -> None:
        signal = getattr(self.app, "changed", None)
        if signal is not None:
            signal.subscribe(self, self._on_changed)
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self._show(self.describe()))  # its colours
        self._show(self.describe())

    def _on_changed(self, change: StudioChange) -> None:
        if isinstance(change, (EngineChanged, StatusChanged, JobsChanged, RunChanged)):
            self._show(self.describe())

    def _show(self, text: Text) -> None:
        # The same line again (most polls of an engine at work) would still lay the screen out anew.
        if text != self._shown:
            self._shown = text
            self.update(text)

    def describe(self) -> Text:
        state = self.app.state
        symbol, colour, label = ENGINE_LABELS.get(state.engine, ("○", "text-muted", f"engine: {state.engine}"))
        theme = self.app.current_theme
        colours = {"success": theme.success, "warning": theme.warning, "error": theme.error}
        text = Text()
        text.append(symbol + " ", style=colours.get(colour) or "")
        text.append(label)
        family = getattr(self.app, "model_family", None)
        if family:
            text.append(f"  │  {family}")
        workers = engine_workers(state.status)
        if len(workers) > 1:  # one worker per device: each device with its memory
            text.append("  │  " + " · ".join(device_memory(w) for w in workers))
        else:
            device = (state.status or {}).get("device") or {}
            name = device.get("device")
            if name and name != "unknown":
                label = name + (f" {device['name']}" if device.get("name") else "")
                text.append("  │  device: " + label)
            else:
                text.append("  │  device: –")
            text.append("  │  VRAM: " + self._vram(device))
        running = sum(1 for job in state.jobs if job.get("status") == "running")
        queued = len(state.queued())
        text.append(f"  │  jobs: {f'{running} running, ' if running else ''}{queued} queued")
        return text

    def _vram(self, device: dict) -> str:
        state = self.app.state
        running = state.running()
        if running:
            track = state.tracks.get(running["id"])
            if track and track.vram_allocated:
                total = f" / {fmt_bytes(track.vram_total)}" if track.vram_total else ""
                return fmt_bytes(track.vram_allocated[-1]) + total
        used = device.get("vram_used_device", device.get("vram_allocated"))
        if isinstance(used, (int, float)):
            total = f" / {fmt_bytes(device['vram_total'])}" if device.get("vram_total") else ""
            return fmt_bytes(used) + total
        return "–"
