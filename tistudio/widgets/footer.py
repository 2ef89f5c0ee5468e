"""The key bar at the bottom of every screen: Textual's Footer, rebuilt only when it would change.

Textual's Footer rebuilds itself on every bindings signal, which each focus move sends, and
remounts every key it shows (each one restyled twice as it binds `compact`): tens of
milliseconds a move on a slow box, mostly for the same keys.  This one remembers what it last
showed (each active binding's key, action, text and state, its compactness) and rebuilds only
when that differs.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Footer


class StudioFooter(Footer):
    _shown: tuple | None = None

    def _showing(self) -> tuple:
        """What compose would show now: the shown bindings and the palette's key, each as it reads
        (not whose it is: another widget's same keys look alike)."""
        palette = self.app.COMMAND_PALETTE_BINDING
        keys = tuple((key, binding.action, binding.description, binding.key_display, binding.tooltip,
                      id(binding.group), enabled, tooltip)
                     for key, (_node, binding, enabled, tooltip) in self.screen.active_bindings.items()
                     if binding.show or key == palette)
        return keys, self.compact, self.show_command_palette

    def compose(self) -> ComposeResult:
        if self._bindings_ready:
            self._shown = self._showing()
        yield from super().compose()

    def bindings_changed(self, screen) -> None:
        self._bindings_ready = True
        if screen.app.app_focus and self.is_attached and screen is self.screen:
            self.call_after_refresh(self._recompose_if_changed)

    async def _recompose_if_changed(self) -> None:
        if self.is_attached and self._showing() != self._shown:
            await self.recompose()
