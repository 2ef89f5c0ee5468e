"""The Metrics screen's views beside Table 1: two evaluations compared, and the study's reports.

    CompareView   pick any two evaluations (A, B) of a concept: every score of each with B − A,
                  then each prompt's SD+TI editability (the prompt as the user wrote it)
    StudyView     pick an experiment report (steps, init, seeds, regularize, synthesis): its
                  table and its grid (prompts × runs) inline; for the trade-off (regularize),
                  each method's mean ± standard error and the frontier chart instead of the grid

Both are handed what engine.store.records read from disk (and the jobs' results) by the screen;
they keep the user's picks across redraws and draw only when something changed.
"""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Label, Select, Static

from engine.store.frontier import frontier
from engine.store.records import ExperimentReport, compare_tables, eval_label
from tistudio.formatting import escape
from tistudio.widgets.charts import FrontierChart
from tistudio.widgets.images import ImagePreview


def num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def signed(value) -> str:
    return f"{value:+.4f}" if isinstance(value, (int, float)) else "–"


def plus_minus(value, se) -> str:
    """`0.425 ± 0.012` (a mean over seeds), or the number alone (one run); the report has four digits."""
    if not isinstance(value, (int, float)):
        return "–"
    return f"{value:.3f}" + (f" ± {se:.3f}" if isinstance(se, (int, float)) else "")


class CompareView(Vertical):
    """Two evaluations of one concept side by side, with their differences."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tables: dict[str, dict] = {}  # by folder: what the pickers offer
        self._drawn: tuple | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="compare-pick"):
            yield Label("A", classes="gen-label-s")
            yield Select([], id="compare-a", compact=True, prompt="(evaluation)")
            yield Label("B", classes="gen-label-s")
            yield Select([], id="compare-b", compact=True, prompt="(evaluation)")
        yield Static("", id="compare-note")
        table = DataTable(id="compare", cursor_type="row", zebra_stripes=True)
        yield table

    def on_mount(self) -> None:
        table = self.query_one("#compare", DataTable)
        for key, label in (("what", "Score"), ("a", "A"), ("b", "B"), ("delta", "Δ (B − A)")):
            table.add_column(label, key=key)

    def set_tables(self, tables: list[dict]) -> None:
        """Offer these evaluations (oldest first).  A and B are the two newest, and become so again
        when a new evaluation arrives; otherwise the user's picks stay."""
        by_dir = {str(t.get("dir")): t for t in tables}
        if list(by_dir) != list(self.tables):
            arrived = bool(set(by_dir) - set(self.tables))
            self.tables = by_dir
            options = [(eval_label(t), key) for key, t in by_dir.items()]
            keys = list(by_dir)
            for select_id, default in (("#compare-a", keys[-2:-1]), ("#compare-b", keys[-1:])):
                select = self.query_one(select_id, Select)
                chosen = select.value
                select.set_options(options)
                if chosen in by_dir and not arrived:
                    select.value = chosen
                elif default:
                    select.value = default[0]
        self.draw()

    def picked(self) -> tuple[dict | None, dict | None]:
        a, b = (self.query_one(i, Select).value for i in ("#compare-a", "#compare-b"))
        return self.tables.get(a) if isinstance(a, str) else None, self.tables.get(b) if isinstance(b, str) else None

    @on(Select.Changed, "#compare-a, #compare-b")
    def draw(self) -> None:
        a, b = self.picked()
        key = (id(a), id(b), len(self.tables))
        if key == self._drawn:
            return
        self._drawn = key
        table = self.query_one("#compare", DataTable)
        note = self.query_one("#compare-note", Static)
        table.clear()
        if a is None or b is None:
            note.update("Evaluate two runs (or two steps of one) with e to compare them here."
                        if len(self.tables) < 2 else "Pick two evaluations, A and B.")
            return
        note.update(_measured_alike(a, b))
        for i, (what, x, y, delta) in enumerate(compare_tables(a, b)):
            table.add_row(what, num(x), num(y), signed(delta), key=str(i))


def _measured_alike(a: dict, b: dict) -> str:
    """A warning when the two were measured differently (their numbers do not compare then)."""
    differences = [name for name, key in (("images per set", "images_per_set"), ("CLIP", "clip"),
                                          ("model", "model")) if a.get(key) != b.get(key)]
    if differences:
        return f"[yellow]Measured differently ({', '.join(differences)}): compare with care.[/yellow]"
    return f"{a.get('images_per_set', '?')} images per set, the same CLIP and model for both."


class StudyView(Vertical):
    """The concept's experiment reports: pick one, see its table and its grid."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reports: dict[str, ExperimentReport] = {}
        self._signature: tuple | None = None
        self._drawn: tuple | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="study-pick"):
            yield Select([], id="study-report", compact=True, prompt="(no experiments yet)")
        yield Static("", id="study-info")
        with Horizontal(id="study-body"):
            yield DataTable(id="study-table", cursor_type="row", zebra_stripes=True)
            yield ImagePreview(None, "", empty="no grid", id="study-grid")
            yield FrontierChart(id="study-frontier")

    def set_reports(self, reports: list[ExperimentReport], prefer: str | None = None) -> None:
        """Offer these reports (oldest first); show `prefer` (an id) if given, else keep the pick,
        else the newest."""
        by_id = {r.id: r for r in reports}
        select = self.query_one("#study-report", Select)
        signature = tuple(_signature(r) for r in reports)
        if signature != self._signature:
            self._signature = signature
            chosen = select.value
            self.reports = by_id
            select.set_options([(r.label(), r.id) for r in reversed(reports)])  # newest on top
            if prefer not in by_id:
                prefer = chosen if chosen in by_id else (reports[-1].id if reports else None)
        if prefer in by_id and select.value != prefer:
            select.value = prefer
        self.draw()

    def shown(self) -> ExperimentReport | None:
        value = self.query_one("#study-report", Select).value
        return self.reports.get(value) if isinstance(value, str) else None

    @on(Select.Changed, "#study-report")
    def draw(self) -> None:
        report = self.shown()
        key = (_signature(report) if report else None, self.app.image_protocol)
        if key == self._drawn:
            return
        self._drawn = key
        table = self.query_one("#study-table", DataTable)
        table.clear(columns=True)
        info = self.query_one("#study-info", Static)
        grid = self.query_one("#study-grid", ImagePreview)
        if report is None:
            info.update("Run an experiment: x steps · i initializer words · s seeds · r regularisers · "
                        "y synthesis batches")
            self.run_worker(grid.set_image(None, ""), group="study-grid")
            grid.display, self.query_one("#study-frontier", FrontierChart).display = True, False
            return
        info.update(escape(report_facts(report)))
        tradeoff = report.kind == "regularize"
        grid.display, self.query_one("#study-frontier", FrontierChart).display = not tradeoff, tradeoff
        self.set_class(tradeoff, "-tradeoff")  # the table takes more width beside the chart
        if tradeoff:
            self._draw_frontier(report, table)
        elif report.kind == "synthesis":
            table.add_column("Prompt", key="label")
            table.add_column("Images", key="images")
            for i, row in enumerate(report.rows):
                table.add_row(row["label"], str(len(row.get("images") or [])), key=str(i))
        else:
            table.add_column("Checkpoint" if report.kind == "steps" else "Run", key="label")
            for key, label in (("reconstruction", "Reconstruction"), ("editability", "Editability"),
                               ("editability_per_image", "Edit./image")):
                table.add_column(label, key=key)
            for i, row in enumerate(report.rows):
                table.add_row(row["label"], num(row.get("reconstruction")), num(row.get("editability")),
                              num(row.get("editability_per_image")), key=str(i))
        path = report.grid
        self.run_worker(grid.set_image(path, f"{report.kind} grid" if path else ""), group="study-grid")


    def _draw_frontier(self, report: ExperimentReport, table: DataTable) -> None:
        """The trade-off: one row per method (its mean ± standard error over its runs; ★ on the
        Pareto front) and the frontier chart.  Older reports get their frontier computed here."""
        data = report.data.get("frontier") or frontier(report.rows)
        for key, label in (("label", "Method"), ("runs", "Runs"), ("reconstruction", "Reconstruction"),
                           ("editability", "Editability"), ("front", "Front")):
            table.add_column(label, key=key)
        for i, p in enumerate(data.get("points") or []):
            table.add_row(p["label"], str(p.get("runs", 1)),
                          plus_minus(p["reconstruction"], p.get("se_reconstruction")),
                          plus_minus(p["editability"], p.get("se_editability")), "★" if p.get("front") else "",
                          key=str(i))
        self.query_one("#study-frontier", FrontierChart).set_frontier(data)


def _signature(report: ExperimentReport) -> tuple:
    """What decides how a report is drawn: a rewritten report (a resumed job) draws again."""
    return report.id, report.kind, len(report.rows), str(report.grid), report.label()


def report_facts(report: ExperimentReport) -> str:
    """One line under the picker: what was measured, how, and where the files are."""
    data = report.data
    parts = []
    if data.get("run"):
        which = "" if data.get("final", True) else f":{data.get('step')}"
        parts.append(f"run {data['run']}{which}")
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    if train.get("steps"):
        parts.append(f"{train['steps']} training steps")
    if data.get("images_per_set"):
        parts.append(f"{data['images_per_set']} images per prompt")
    elif data.get("seeds"):
        parts.append(f"seeds {data['seeds'][0]}–{data['seeds'][-1]}")
    if report.dir:
        parts.append(f"in {Path(report.dir).name}/")
    return " · ".join(parts)
