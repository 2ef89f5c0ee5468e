"""4 Metrics: Table 1 for a concept (SD vs SD+TI reconstruction and editability, with the
difference), the per-prompt detail, and the curve over checkpoints from the steps
experiment; e starts an evaluation, x the steps experiment.  Reads the tables and curves
the engine wrote through engine.records."""

from __future__ import annotations

import json

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Label, Select, Static

from engine.records import curve_points, eval_tables, latest_done_run, steps_curves
from tistudio.formatting import escape
from tistudio.messages import Changes, JobsChanged, LibraryChanged, MetricsChanged
from tistudio.screens.base import StudioScreen
from tistudio.widgets.charts import CurveChart

METRIC_JOBS = ("eval", "experiment")


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def _diff(a, b) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return f"{b - a:+.4f}"
    return "–"


class MetricsScreen(StudioScreen):
    MODE = "metrics"
    HOME_FOCUS = "#table1"
    AUTO_FOCUS = "#table1"
    BINDINGS = [
        Binding("e", "evaluate", "Evaluate"),
        Binding("x", "steps_experiment", "Steps experiment"),
        Binding("c", "choose_concept", "Concept", show=False),
    ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._concepts: tuple = ()
        self._drawn: tuple | None = None
        self.table: dict | None = None
        self.curve: dict | None = None
        self._jobs_seen: tuple | None = None

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="metrics-top"):
            yield Label("Concept", classes="gen-label")
            yield Select([], id="metrics-concept", compact=True, prompt="(none)")
            yield Static("", id="metrics-source")
        with Horizontal(id="metrics-body"):
            with Vertical(id="metrics-tables"):
                table1 = DataTable(id="table1", cursor_type="row", zebra_stripes=False)
                table1.border_title = "Table 1"
                yield table1
                detail = DataTable(id="per-prompt", cursor_type="row", zebra_stripes=True)
                detail.border_title = "Editability per prompt"
                yield detail
            curve = CurveChart(id="curve")
            yield curve
        yield Static("", id="metrics-jobs")

    def on_mount(self) -> None:
        t1 = self.query_one("#table1", DataTable)
        t1.add_column("Model", key="model")
        t1.add_column("Reconstruction", key="rec")
        t1.add_column("Editability", key="edit")
        t1.add_column("Edit./image", key="edit_img")
        pp = self.query_one("#per-prompt", DataTable)
        pp.add_column("Prompt", key="prompt")
        pp.add_column("SD", key="sd")
        pp.add_column("SD+TI", key="ti")
        pp.add_column("Δ", key="diff")
        super().on_mount()

    def concept(self) -> str | None:
        value = self.query_one("#metrics-concept", Select).value
        return value if isinstance(value, str) else None

    # -- state → screen

    def redraw(self, changes: Changes) -> None:
        if changes.any(LibraryChanged):
            self._refresh_concepts()
        jobs = self._metric_jobs()
        for job in jobs:
            if job.get("status") in ("queued", "running"):
                self.app.watch_run(job["id"])
        seen = tuple((j.get("id"), j.get("status")) for j in jobs)
        if changes.any(LibraryChanged, MetricsChanged) or (changes.any(JobsChanged) and seen != self._jobs_seen):
            self._jobs_seen = seen
            self._load()
        self._draw_jobs(jobs)

    def _refresh_concepts(self) -> None:
        self._concepts = self.sync_concept_select(self.query_one("#metrics-concept", Select), self._concepts)

    def _metric_jobs(self) -> list[dict]:
        name = self.concept()
        return [j for j in self.app.state.jobs if j.get("kind") in METRIC_JOBS and j.get("concept") == name]

    def _load(self) -> None:
        name = self.concept()
        table = curve = None
        path = self._concept_dir(name)
        if path is not None:
            tables = eval_tables(path)
            table = tables[-1] if tables else None
            curves = steps_curves(path)
            curve = curves[-1] if curves else None
            # a finished job's own result, if the disk has nothing newer (or nothing)
            for job in self._metric_jobs():
                result = job.get("result") or {}
                if job.get("kind") == "eval" and isinstance(result.get("table"), dict) and table is None:
                    table = result["table"]
                if job.get("kind") == "experiment" and curve is None and (result.get("points") or
                                                                           result.get("curve")):
                    curve = result
        key = (name, json.dumps(table, sort_keys=True, default=str)[:100000] if table else None,
               json.dumps(curve, sort_keys=True, default=str)[:100000] if curve else None)
        if key == self._drawn:
            return
        self._drawn = key
        self.table, self.curve = table, curve
        self._draw_table(name, table)
        self.query_one("#curve", CurveChart).set_points(curve_points(curve) if curve else [])

    def _draw_table(self, name: str | None, table: dict | None) -> None:
        t1 = self.query_one("#table1", DataTable)
        pp = self.query_one("#per-prompt", DataTable)
        t1.clear()
        pp.clear()
        source = self.query_one("#metrics-source", Static)
        if not table:
            source.update("no evaluation yet: press e to evaluate" if name else "no concept: create one on 1")
            return
        rows = {r.get("model"): r for r in table.get("rows", []) if isinstance(r, dict)}
        sd, ti = rows.get("SD", {}), rows.get("SD+TI", {})
        for label, row in (("SD", sd), ("SD+TI", ti)):
            t1.add_row(label, _num(row.get("reconstruction")), _num(row.get("editability")),
                       _num(row.get("editability_per_image")), key=label)
        t1.add_row("Δ (TI − SD)", _diff(sd.get("reconstruction"), ti.get("reconstruction")),
                   _diff(sd.get("editability"), ti.get("editability")),
                   _diff(sd.get("editability_per_image"), ti.get("editability_per_image")), key="diff")
        for i, p in enumerate(table.get("per_prompt", [])):
            if not isinstance(p, dict):
                continue
            a = (p.get("SD") or {}).get("editability")
            b = (p.get("SD+TI") or {}).get("editability")
            pp.add_row(p.get("clip_text") or p.get("prompt") or f"prompt {i + 1}", _num(a), _num(b), _diff(a, b),
                       key=str(i))
        step = "final" if table.get("final", True) else f"step {table.get('step')}"
        clip = (table.get("clip") or {}).get("name") if isinstance(table.get("clip"), dict) else table.get("clip")
        source.update(f"run {table.get('run', '?')} ({step}) · {table.get('images_per_set', '?')} images/set"
                      + (f" · CLIP {clip}" if clip else ""))

    def _draw_jobs(self, jobs: list[dict]) -> None:
        line = self.query_one("#metrics-jobs", Static)
        active = [j for j in jobs if j.get("status") in ("queued", "running")]
        if active:
            parts = []
            for j in active:
                track = self.app.state.tracks.get(j["id"])
                progress = f" {track.progress:.0%}" if track and track.progress is not None else ""
                what = "evaluation" if j.get("kind") == "eval" else "steps experiment"
                parts.append(f"{what} {j['id']}: {j.get('status')}{progress}")
            line.update(" · ".join(parts))
            return
        failed = [j for j in jobs[-1:] if j.get("status") == "failed"]
        if failed:
            line.update(f"[red]last {failed[0].get('kind')} failed: {escape(failed[0].get('error') or '')}[/red]")
        else:
            line.update("e evaluates the latest finished run · x runs the steps experiment")

    @on(Select.Changed, "#metrics-concept")
    def _concept_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self.app.selected_concept = event.value
            self._load()
            self._draw_jobs(self._metric_jobs())

    # -- user → engine

    def _concept_dir(self, name: str | None):
        """The concept's folder in the library, or None (no name, or it is gone meanwhile)."""
        from engine.errors import UserError
        from engine.library import Library

        if not name:
            return None
        try:
            return Library(self.app.home).get(name).path
        except (UserError, OSError):
            return None

    def _common(self) -> dict | None:
        name = self.concept()
        if not name:
            self.notify("Choose a concept first.", severity="warning")
            return None
        path = self._concept_dir(name)
        run = latest_done_run(path) if path is not None else None
        if not run:
            self.notify(f"{name} has no finished training run yet; train it on 2 Train.", severity="warning")
            return None
        params = {"run": run, "model": self.app.model, **self.app.eval_params}
        if self.app.clip:
            params["clip"] = self.app.clip
        if self.app.eval_images:
            params["images"] = self.app.eval_images
        return params

    def action_evaluate(self) -> None:
        params = self._common()
        if params is not None:
            self.app.bridge.submit("eval", self.concept(), params, origin=self.MODE)

    def action_steps_experiment(self) -> None:
        params = self._common()
        if params is not None:
            self.app.bridge.submit("experiment", self.concept(), {"kind": "steps", **params}, origin=self.MODE)

    def action_choose_concept(self) -> None:
        self.query_one("#metrics-concept", Select).focus()

