"""Inline images: textual-image with kitty (TGP), sixel or half-block cells.

`setup_images(protocol)` must run before `App.run`: textual-image asks the
terminal what it supports when it is imported, which is impossible once
Textual owns stdin.  With `auto` it probes (sixel, then kitty, else half-block);
with a named protocol it skips the probe, which is what an SSH session whose
probe times out needs (`TISTUDIO_IMAGE_PROTOCOL=halfblock` or the config file).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static

_chosen: dict[str, str] = {}


class _NoTTY:
    """A stand-in for sys.__stdout__ that says it is not a terminal (so no probe)."""

    def __init__(self, real):
        self._real = real

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._real, name)


def _import_textual_image(probe: bool) -> None:
    if "textual_image.renderable" not in sys.modules and not probe and sys.__stdout__ is not None:
        real = sys.__stdout__
        sys.__stdout__ = _NoTTY(real)
        try:
            import textual_image.renderable  # imported for its side effect
        finally:
            sys.__stdout__ = real
    import textual_image.widget  # noqa: F401 - fills the cell-size cache while we still may


def setup_images(protocol: str = "auto") -> str:
    """Import textual-image for `protocol`; return the protocol images will actually use."""
    from tistudio.config import normalise_protocol

    protocol = normalise_protocol(protocol) or "auto"
    _import_textual_image(probe=protocol == "auto")
    _chosen["protocol"] = protocol
    return resolved_protocol(protocol)


def resolved_protocol(protocol: str | None = None) -> str:
    """What `auto` turned into: kitty, sixel, halfblock (or unicode when not on a terminal)."""
    protocol = protocol or _chosen.get("protocol", "auto")
    if protocol != "auto":
        return protocol
    from textual_image import renderable

    return {renderable.SixelImage: "sixel", renderable.TGPImage: "kitty",
            renderable.HalfcellImage: "halfblock"}.get(renderable.Image, "unicode")


def image_class(protocol: str | None = None) -> type[Widget]:
    """The textual-image widget class for `protocol` (default: the one set up)."""
    protocol = protocol or _chosen.get("protocol", "auto")
    if "textual_image.widget" not in sys.modules:
        setup_images(protocol)
    import textual_image.widget as tiw

    return {"kitty": tiw.TGPImage, "sixel": tiw.SixelImage, "halfblock": tiw.HalfcellImage}.get(protocol, tiw.Image)


def _readable_image(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - any unreadable file is just "no image"
        return False


class ImagePreview(Vertical):
    """One image with a one-line caption under it; shows a placeholder when there is none.

    `protocol`: None uses the app's choice (`app.image_protocol`), else kitty/sixel/halfblock/auto.
    """

    DEFAULT_CSS = """
    ImagePreview { height: auto; width: auto; }
    ImagePreview > .image { width: 16; height: 8; }
    ImagePreview > .placeholder { width: 16; height: 8; content-align: center middle; color: $text-muted;
                                  background: $boost; }
    ImagePreview > .caption { width: 100%; height: 1; text-wrap: nowrap; text-overflow: ellipsis; color: $text-muted; }
    """

    def __init__(self, path: str | Path | None = None, caption: str = "", *, empty: str = "no image",
                 protocol: str | None = None, name: str | None = None, id: str | None = None,
                 classes: str | None = None):
        super().__init__(name=name, id=id, classes=classes)
        self._path = Path(path) if path else None
        self._caption = caption
        self._empty = empty
        self._protocol = protocol
        self._lock = asyncio.Lock()  # one swap at a time: updates may come faster than a remount

    @property
    def path(self) -> Path | None:
        return self._path

    def _protocol_name(self) -> str | None:
        return self._protocol or getattr(self.app, "image_protocol", None)

    def _make(self) -> Widget:
        if self._path is not None and self._path.is_file() and _readable_image(self._path):
            widget = image_class(self._protocol_name())(str(self._path), classes="image")
            widget.tooltip = str(self._path)
            return widget
        return Static(self._empty, classes="placeholder")

    def compose(self) -> ComposeResult:
        yield self._make()
        if self._caption:
            yield Static(self._caption, classes="caption", markup=False)

    async def reload(self) -> None:
        """Draw the image again (after the image protocol changed)."""
        async with self._lock:
            await self.remove_children()
            await self.mount_all(list(self.compose()))

    async def set_image(self, path: str | Path | None, caption: str | None = None) -> None:
        """Show another image (or the placeholder); cheap when nothing changed."""
        async with self._lock:
            new = Path(path) if path else None
            if new == self._path and (caption is None or caption == self._caption) and self.children:
                return
            self._path = new
            if caption is not None:
                self._caption = caption
            await self.remove_children()
            await self.mount_all(list(self.compose()))
