"""The Library's concept panel: the concept's token, initializer and description, thumbnails of its
training images, its runs and its word, and the word's latest inspection."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Static

from engine.errors import one_line
from engine.store.records import ConceptSummary
from tistudio.formatting import escape
from tistudio.widgets.forms import shorten_path
from tistudio.widgets.images import ImagePreview

MAX_THUMBS = 8


class ConceptPanel(VerticalScroll):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.border_title = "Concept"
        self._shown: object = object()  # what the panel shows (nothing yet)

    def compose(self) -> ComposeResult:
        yield Static("", id="detail-text")
        yield Horizontal(id="thumbs")
        yield Static("", id="detail-runs")
        yield Static("", id="inspect")

    def show(self, row: ConceptSummary | None, inspection: tuple[str, str] | None, asked: set[str],
             home: Path) -> None:
        """The concept `row` (None: how to make one), its word's inspection (job id, text), scrolled
        into view when it is one the screen asked for (`asked`)."""
        text = self.query_one("#detail-text", Static)
        runs_text = self.query_one("#detail-runs", Static)
        key = (row.name, tuple(row.images),
               tuple((r.id, r.status, r.step) for r in row.runs),
               row.concept.description, row.best_reconstruction, inspection) if row else None
        if key == self._shown:
            return
        self._shown = key
        panel = self.query_one("#inspect", Static)
        panel.update(inspection[1] if inspection else "")
        if inspection and inspection[0] in asked:  # what the user asked for: bring it into view
            self.call_after_refresh(self.scroll_to_widget, panel, top=True, animate=False)
        thumbs = self.query_one("#thumbs", Horizontal)
        thumbs.remove_children()
        if row is None:
            text.update("No concepts yet.  Press n to create one from a folder of 3-5 images,\n"
                        "or i to import an embedding file.")
            runs_text.update("")
            return
        concept, runs = row.concept, row.train_runs
        self.border_title = concept.name
        text.update(
            f"[b]{concept.token}[/b]  initializer [b]{concept.init}[/b]  ({concept.property})\n"
            f"[dim]{escape(concept.description)}[/dim]\n"
            + (f"{len(row.images)} training image{'s' if len(row.images) != 1 else ''} in "
               f"[dim]{escape(shorten_path(concept.path / 'images', home))}[/dim]" if row.images else
               "No training images yet: press e to add some."))
        thumbs.mount_all([ImagePreview(p, p.name, classes="thumb") for p in row.images[:MAX_THUMBS]])
        word = _word_line(row)
        if runs:
            last = runs[-1]
            best = f"best SD+TI reconstruction {row.best_reconstruction:.3f}" if row.best_reconstruction is not None \
                else "not evaluated yet (4 Metrics, e)"
            runs_text.update(f"{len(runs)} training run{'s' if len(runs) != 1 else ''}; latest "
                             f"{last.id} {last.status} at step {last.step}/{last.steps or '?'}\n{word}{best}")
        elif row.word_runs:
            runs_text.update(f"{word}Press v to inspect it.")
        else:
            runs_text.update("Not trained yet: press t to train it.")


def inspection(row: ConceptSummary | None, jobs: list[dict]) -> tuple[str, str] | None:
    """(job id, panel text) for the selected concept's word inspector: its newest finished
    inspection, or a line saying one is under way."""
    if row is None:
        return None
    jobs = [j for j in jobs if j.get("kind") == "inspect" and j.get("concept") == row.name]
    active = [j for j in jobs if j.get("status") in ("queued", "running")]
    if active:
        return active[-1]["id"], f"[dim]Inspecting the word ({active[-1]['id']}: {active[-1].get('status')})…[/dim]"
    done = [j for j in jobs if j.get("status") == "done" and isinstance(j.get("result"), dict)]
    latest = row.latest_inspection()
    record = done[-1] if done else latest.as_dict() if latest else None
    if record is None:
        failed = [j for j in jobs if j.get("status") == "failed"]
        if failed:
            return failed[-1]["id"], f"[red]Inspection failed: {escape(failed[-1].get('error') or '')}[/red]"
        return None
    from tistudio.widgets.inspect import inspect_text

    try:
        return record["id"], "\n" + inspect_text(record["result"])
    except Exception as exc:  # noqa: BLE001 - a result of another shape must not break the library
        return record["id"], f"[red]cannot show the inspection: {escape(one_line(exc))}[/red]"


def _word_line(row: ConceptSummary) -> str:
    """`1 vector, made for SD 1.x; ` (empty before the concept has a word)."""
    if not row.vectors:
        return ""
    from engine.sd.family import FAMILY_LABELS

    family = FAMILY_LABELS.get(row.family, row.family) if row.family else None
    return f"its word: {row.vectors} vector{'s' if row.vectors != 1 else ''}" + (f" for {family}" if family else "") \
        + "; "
