"""5 Gallery: every image the engine made — generations, evaluation sets, experiment images and
their grids — newest first, filterable by concept, run and kind; the highlighted one drawn
inline with the record it was saved with (prompt, seed, sampler, model, the words it used).

Reads the data directory through engine.store.records (in a thread: a library with thousands of
images must not stall a redraw); no engine needed.
"""

from __future__ import annotations

import time
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Label, Select, Static

from engine.errors import one_line
from engine.store.records import GALLERY_KINDS, GalleryImage, gallery, image_metadata
from tistudio.formatting import escape
from tistudio.messages import Changes, JobsChanged, LibraryChanged, MetricsChanged
from tistudio.screens.base import StudioScreen
from tistudio.widgets.forms import shorten_path
from tistudio.widgets.images import ImagePreview

ALL = "*"  # a filter's "everything" choice
MAX_ROWS = 500  # the newest this many are listed; the count says how many more there are
FILTERS = ("concept", "run", "kind")


class GalleryScreen(StudioScreen):
    MODE = "gallery"
    HOME_FOCUS = "#gallery-list"
    AUTO_FOCUS = "#gallery-list"
    BINDINGS = [
        Binding("c", "choose('concept')", "Concept"),
        Binding("r", "choose('run')", "Run"),
        Binding("k", "choose('kind')", "Kind"),
        Binding("u", "reload", "Refresh"),
    ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images: list[GalleryImage] = []  # everything on disk, newest first
        self.shown: list[GalleryImage] = []  # after the filters
        self._finished: tuple | None = None
        self._options: dict[str, tuple] = {}
        self._selected: Path | None = None

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="gallery-top"):
            for name, label in (("concept", "Concept"), ("run", "Run"), ("kind", "Kind")):
                yield Label(label, classes="gen-label-s")
                yield Select([("all", ALL)], value=ALL, allow_blank=False, id=f"gallery-{name}", compact=True)
        with Horizontal(id="gallery-body"):
            table = DataTable(id="gallery-list", cursor_type="row", zebra_stripes=True)
            table.border_title = "Images"
            yield table
            with VerticalScroll(id="gallery-detail") as detail:
                detail.border_title = "Image"
                yield ImagePreview(None, "", empty="no image", id="gallery-image")
                yield Static("", id="gallery-meta")

    def on_mount(self) -> None:
        table = self.query_one("#gallery-list", DataTable)
        for key, label in (("image", "Image"), ("kind", "Kind"), ("concept", "Concept"), ("run", "Run"),
                           ("source", "From"), ("when", "When (UTC)")):
            table.add_column(label, key=key)
        kinds = self.query_one("#gallery-kind", Select)
        kinds.set_options([("all", ALL)] + [(k, k) for k in GALLERY_KINDS])
        kinds.value = ALL
        super().on_mount()

    # -- state → screen

    def redraw(self, changes: Changes) -> None:
        finished = tuple(j.get("id") for j in self.app.state.jobs
                         if j.get("status") == "done" and j.get("kind") in ("generate", "eval", "experiment"))
        if changes.any(LibraryChanged, MetricsChanged) or (changes.any(JobsChanged) and finished != self._finished):
            self._finished = finished
            self.action_reload()

    def action_reload(self) -> None:
        self.run_worker(self._scan, thread=True, exclusive=True, group="gallery-scan", exit_on_error=False)

    def _scan(self) -> None:
        try:
            images = gallery(self.app.home)
        except OSError as exc:
            self.app.call_from_thread(self.notify, f"cannot read the gallery: {one_line(exc)}", severity="error")
            return
        try:
            self.app.call_from_thread(self._loaded, images)
        except RuntimeError:
            pass  # the app has gone meanwhile

    def _loaded(self, images: list[GalleryImage]) -> None:
        if images == self.images and self.shown:
            return  # nothing new on disk: leave the list (and the user's place in it) alone
        self.images = images
        self._refresh_filters()
        self._list()

    def _filter(self, name: str) -> str | None:
        value = self.query_one(f"#gallery-{name}", Select).value
        return None if value in (ALL, Select.NULL) else value

    def _refresh_filters(self) -> None:
        """Offer the concepts and runs that have images (runs: of the chosen concept)."""
        concept = self._filter("concept")
        concepts = sorted({i.concept for i in self.images if i.concept})
        runs = sorted({i.run for i in self.images if i.run and (concept is None or i.concept == concept)},
                      reverse=True)
        for name, values in (("concept", concepts), ("run", runs)):
            if self._options.get(name) == tuple(values):
                continue
            self._options[name] = tuple(values)
            select = self.query_one(f"#gallery-{name}", Select)
            chosen = select.value
            with select.prevent(Select.Changed):
                select.set_options([("all", ALL)] + [(v, v) for v in values])
                select.value = chosen if chosen in values else ALL

    def _list(self) -> None:
        current = self._highlighted()  # the user's place: kept when the list is drawn again
        if current is not None:
            self._selected = current.path
        concept, run, kind = (self._filter(n) for n in FILTERS)
        self.shown = [i for i in self.images if (concept is None or i.concept == concept)
                      and (run is None or i.run == run) and (kind is None or i.kind == kind)]
        table = self.query_one("#gallery-list", DataTable)
        table.clear()
        for image in self.shown[:MAX_ROWS]:
            when = time.strftime("%m-%d %H:%M", time.gmtime(image.mtime))
            table.add_row(image.path.name, image.kind, image.concept or "–", image.run or "–", image.source, when,
                          key=str(image.path))
        count = len(self.shown)
        table.border_subtitle = (f"{count} image{'s' if count != 1 else ''}"
                                 + (f", the newest {MAX_ROWS} listed" if count > MAX_ROWS else ""))
        paths = [i.path for i in self.shown[:MAX_ROWS]]
        if self._selected in paths:
            table.move_cursor(row=paths.index(self._selected), animate=False)
        self._show(self._highlighted())

    def _highlighted(self) -> GalleryImage | None:
        table = self.query_one("#gallery-list", DataTable)
        row = table.cursor_row
        return self.shown[row] if self.shown and 0 <= row < min(len(self.shown), MAX_ROWS) else None

    def _show(self, image: GalleryImage | None) -> None:
        meta = self.query_one("#gallery-meta", Static)
        preview = self.query_one("#gallery-image", ImagePreview)
        self._selected = image.path if image else None
        if image is None:
            meta.update("No images yet: generate on 3, evaluate or run an experiment on 4."
                        if not self.images else "No image matches the filters.")
            self.run_worker(preview.set_image(None, ""), group="gallery-image")
            return
        self.query_one("#gallery-detail").border_title = image.path.name
        self.run_worker(preview.set_image(image.path, image.source), group="gallery-image")
        meta.update(describe_image(image, image_metadata(image.path), self.app.home))

    @on(DataTable.RowHighlighted, "#gallery-list")
    def _row_highlighted(self) -> None:
        self._show(self._highlighted())

    @on(Select.Changed, "#gallery-concept, #gallery-run, #gallery-kind")
    def _filter_changed(self, event: Select.Changed) -> None:
        if event.select.id == "gallery-concept":
            self._refresh_filters()
        self._list()

    def action_choose(self, name: str) -> None:
        self.query_one(f"#gallery-{name}", Select).focus()


def describe_image(image: GalleryImage, meta: dict, home: Path | None = None) -> str:
    """The image's record as lines of markup: prompt, negative prompt, seed, steps, sampler,
    guidance, size, model, the words it used, when; then where it is."""
    lines = []
    if meta.get("prompt"):
        lines.append(f"[b]{escape(meta['prompt'])}[/b]")
    if meta.get("negative_prompt"):
        lines.append(f"[dim]negative:[/dim] {escape(meta['negative_prompt'])}")
    settings = [f"{name} {meta[key]}" for key, name in (("seed", "seed"), ("steps", "steps"), ("sampler", "sampler"),
                                                         ("guidance", "CFG")) if meta.get(key) is not None]
    if meta.get("width") and meta.get("height"):
        settings.append(f"{meta['width']}×{meta['height']}")
    if settings:
        lines.append(escape(" · ".join(map(str, settings))))
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    if model:
        from engine.sd.family import FAMILY_LABELS

        family = FAMILY_LABELS.get(model.get("family"), model.get("family"))
        lines.append(f"model {escape(model.get('spec', '?'))}" + (f" ({escape(family)})" if family else ""))
    for word in meta.get("embeddings") or []:
        if isinstance(word, dict):
            at = "final" if word.get("final") else f"step {word.get('step')}"
            lines.append(f"word {escape(word.get('token', '?'))} = {escape(word.get('concept', '?'))}@"
                         f"{escape(word.get('run', '?'))} ({at})")
    if meta.get("parameters") and not lines:
        lines.append(escape(meta["parameters"]))
    if meta.get("created"):
        lines.append(f"[dim]made {escape(meta['created'])}[/dim]")
    if not meta:
        lines.append("[dim]no record saved with this image (a grid: its report is beside it)[/dim]")
    where = shorten_path(image.path, home) if home else str(image.path)
    lines.append(f"[dim]{escape(where)}[/dim]")
    return "\n".join(lines)
