"""1 Library: the concepts, with thumbnails of their training images and how many vectors
their word has; create, import, export, rename, delete, add and remove images; v inspects a
word (an engine job: its norms against the vocabulary, its cosine to the initializer, its
nearest tokens, and how alike the words of several runs are), shown in the concept's panel.
Reads the library straight from disk through engine.store.records (no engine needed)."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable

from engine.errors import one_line
from engine.store.records import ConceptSummary
from tistudio.messages import Changes, JobsChanged, LibraryChanged, RunSubmitted
from tistudio.screens.base import StudioScreen
from tistudio.screens.modals import (
    ConfirmModal,
    ExportModal,
    ExportRequest,
    ImagesEdited,
    ImagesModal,
    ImportModal,
    ImportRequest,
    NewConceptModal,
    TextModal,
)
from tistudio.widgets.concept_panel import ConceptPanel, inspection


class LibraryScreen(StudioScreen):
    MODE = "library"
    HOME_FOCUS = "#concepts"
    AUTO_FOCUS = "#concepts"
    BINDINGS = [
        Binding("n", "new_concept", "New"),
        Binding("i", "import_embedding", "Import"),
        Binding("x", "export_concept", "Export"),
        Binding("r", "rename_concept", "Rename"),
        Binding("d", "delete_concept", "Delete"),
        Binding("e", "edit_images", "Images", show=False),  # the footer is full at 80 columns
        Binding("t", "train_concept", "Train"),
        Binding("g", "generate_with", "Generate", show=False),
        Binding("m", "concept_metrics", "Metrics", show=False),
        Binding("v", "inspect_word", "Inspect", show=False),
    ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[ConceptSummary] = []
        self._asked: set[str] = set()  # inspect jobs this screen submitted: scrolled into view

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="lib-body"):
            table = DataTable(id="concepts", cursor_type="row", zebra_stripes=True)
            table.border_title = "Concepts"
            yield table
            yield ConceptPanel(id="concept-detail")

    def on_mount(self) -> None:
        table = self.query_one("#concepts", DataTable)
        for key, label in (("name", "Name"), ("token", "Token"), ("init", "Init"), ("type", "Type"),
                           ("vectors", "Vec"), ("images", "Imgs"), ("runs", "Runs"), ("best", "Best rec.")):
            table.add_column(label, key=key)
        super().on_mount()

    # -- drawing

    def redraw(self, changes: Changes) -> None:
        self._asked.update(c.run_id for c in changes.of(RunSubmitted) if c.origin == self.MODE)
        jobs = tuple((j.get("id"), j.get("status")) for j in self.app.state.jobs
                     if j.get("kind") in ("train", "eval", "experiment", "inspect"))
        if changes.any(LibraryChanged) or (changes.any(JobsChanged) and jobs != getattr(self, "_jobs_seen", None)):
            self._jobs_seen = jobs
            self.reload()

    def reload(self) -> None:
        try:
            rows = self.app.library.summaries()
        except Exception as exc:  # noqa: BLE001 - a damaged library must not take the studio down
            self.notify(f"cannot read the library: {one_line(exc)}", severity="error")
            rows = []
        signature = tuple((r.name, r.concept.token, r.concept.init, r.concept.property, len(r.images),
                           len(r.train_runs), r.best_reconstruction, r.concept.description, r.vectors) for r in rows)
        self.rows = rows
        table = self.query_one("#concepts", DataTable)
        if signature != getattr(self, "_signature", None):
            self._signature = signature
            current = self.selected_name() or self.app.selected_concept
            table.clear()
            for r in rows:
                c = r.concept
                best = f"{r.best_reconstruction:.3f}" if r.best_reconstruction is not None else "–"
                done, trained = len(r.done_train_runs), len(r.train_runs)
                runs = f"{trained}" + (f" ({done}✓)" if done and done != trained else "")
                vectors = str(r.vectors) if r.vectors else "–"
                table.add_row(c.name, c.token, c.init, c.property, vectors, str(len(r.images)), runs, best,
                              key=c.name)
            names = [r.name for r in rows]
            if current in names:
                table.move_cursor(row=names.index(current))
        table.border_subtitle = f"{len(rows)} concept{'s' if len(rows) != 1 else ''}"
        self.show_detail()

    def selected_name(self) -> str | None:
        table = self.query_one("#concepts", DataTable)
        if not self.rows or table.row_count == 0:
            return None
        row = table.cursor_row
        if 0 <= row < len(self.rows):
            return self.rows[row].name
        return None

    def selected(self) -> ConceptSummary | None:
        name = self.selected_name()
        return next((r for r in self.rows if r.name == name), None)

    @on(DataTable.RowHighlighted, "#concepts")
    def _highlighted(self) -> None:
        name = self.selected_name()
        if name:
            self.app.selected_concept = name
        self.show_detail()

    @on(DataTable.RowSelected, "#concepts")
    def _selected(self) -> None:
        self.action_train_concept()

    def show_detail(self) -> None:
        row = self.selected()
        self.query_one(ConceptPanel).show(row, inspection(row, self.app.state.jobs), self._asked, self.app.home)

    # -- actions

    def _need(self) -> ConceptSummary | None:
        row = self.selected()
        if row is None:
            self.notify("No concept selected: create one with n.", severity="warning")
        return row

    def _busy(self, name: str) -> bool:
        active = [j for j in self.app.state.jobs if j.get("concept") == name and j.get("status") in ("queued",
                                                                                                     "running")]
        if active:
            self.notify(f"{name} has {len(active)} job(s) queued or running; cancel them first (2 Train, c).",
                        severity="error")
        return bool(active)

    def action_new_concept(self) -> None:
        def done(name: str | None) -> None:
            if name:
                self.app.selected_concept = name
                self.notify(f"Concept {name} created.", title="Library")

        self.app.push_screen(NewConceptModal(self.app.library), done)

    def action_import_embedding(self) -> None:
        def done(request: ImportRequest | None) -> None:
            if request is None:
                return
            self.notify(f"Importing {request.file.name}…", title="Library")
            self.app.bridge.run_cli("import", request.cli_args())

        self.app.push_screen(ImportModal(), done)

    def action_export_concept(self) -> None:
        row = self._need()
        if row is None:
            return
        if not row.done_train_runs:
            self.notify(f"{row.name} has no finished run to export; train it first (t).", severity="warning")
            return
        runs = [(f"{r.id} ({r.steps or '?'} steps)", r.id) for r in row.done_train_runs]
        out = str(Path.cwd() / f"{row.name}.safetensors")

        def done(request: ExportRequest | None) -> None:
            if request is not None:
                self.app.bridge.run_cli("export", request.cli_args(row.name))

        self.app.push_screen(ExportModal(row.name, runs, out), done)

    def action_rename_concept(self) -> None:
        row = self._need()
        if row is None or self._busy(row.name):
            return
        from engine.errors import UserError
        from engine.store.library import validate_name

        def check(value: str) -> str | None:
            try:
                validate_name(value)
            except UserError as exc:
                return str(exc)
            return None

        def done(new: str | None) -> None:
            if not new or new == row.name:
                return
            try:
                renamed = self.app.library.rename(row.name, new)
            except (UserError, OSError) as exc:
                self.notify(one_line(exc), severity="error", title="Rename")
                return
            self.app.selected_concept = renamed.name
            self.notify(f"{row.name} is now {renamed.name} ({renamed.token}).", title="Library")

        self.app.push_screen(TextModal(f"Rename {row.name}", "New name", row.name, "Rename", check,
                                       hint="Its images and runs come along; a default token follows the name."),
                             done)

    def action_delete_concept(self) -> None:
        row = self._need()
        if row is None or self._busy(row.name):
            return
        from engine.errors import UserError

        def done(yes: bool) -> None:
            if not yes:
                return
            try:
                self.app.library.delete(row.name)
            except (UserError, OSError) as exc:
                self.notify(one_line(exc), severity="error", title="Delete")
                return
            self.notify(f"Deleted {row.name}.", title="Library")

        runs = len(row.train_runs)
        self.app.push_screen(ConfirmModal(
            f"Delete {row.name}?",
            f"This deletes {row.name} ({row.concept.token}), its {len(row.images)} training images and its {runs} "
            f"run{'s' if runs != 1 else ''} with every embedding they saved.  It cannot be undone.",
            "Delete", danger=True), done)

    def action_edit_images(self) -> None:
        row = self._need()
        if row is None:
            return

        def done(edited: ImagesEdited | None) -> None:
            if edited is None:
                return
            parts = [f"{len(edited.added)} added" if edited.added else "",
                     f"{len(edited.removed)} removed" if edited.removed else "",
                     f"{len(edited.captioned)} captioned" if edited.captioned else ""]
            self.notify(f"Images of {row.name}: {', '.join(p for p in parts if p)}.", title="Library")

        self.app.push_screen(ImagesModal(self.app.library, row.name, row.images), done)

    def action_train_concept(self) -> None:
        row = self._need()
        if row:
            self.app.selected_concept = row.name
            self.app.action_show_screen("train")

    def action_generate_with(self) -> None:
        row = self._need()
        if row:
            self.app.selected_concept = row.name
            token = row.concept.token
            self.app.prompt_hint = f"a photo of {token}" if row.concept.property == "object" else \
                f"a painting in the style of {token}"
            self.app.action_show_screen("generate")

    def action_inspect_word(self) -> None:
        """Inspect the concept's word (an engine job): NAME for its latest finished run, or a saved
        NAME@RUN:STEP; the report shows in the concept's panel."""
        row = self._need()
        if row is None:
            return
        if not row.word_runs:
            self.notify(f"{row.name} has no word yet; train it first (t).", severity="warning")
            return
        from engine.store.records import parse_pin
        from tistudio.widgets.forms import PinSuggester

        pins = row.pins()

        def check(value: str) -> str | None:
            if value == row.name or value in pins:
                return None
            return f"Write {row.name} (its latest finished run) or a saved {row.name}@RUN:STEP (→ completes them)."

        def done(value: str | None) -> None:
            if not value:
                return
            _, run, step = parse_pin(value)
            params = {"run": run, "step": step, "top": 10, **self.app.model_params()}
            self.app.bridge.submit("inspect", row.name, params, origin=self.MODE)

        self.app.push_screen(TextModal(f"Inspect {row.name}'s word", "Word", row.name, "Inspect", check,
                                       hint="Norms against the vocabulary, cosine to the initializer, the nearest "
                                            "tokens, and how alike its runs' words are.",
                                       suggester=PinSuggester(lambda: pins)), done)

    def action_concept_metrics(self) -> None:
        row = self._need()
        if row:
            self.app.selected_concept = row.name
            self.app.action_show_screen("metrics")
