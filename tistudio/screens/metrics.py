"""4 Metrics: the whole study for one concept.

    Concept, Run     which concept, and which of its saved words (NAME@RUN:STEP; or its latest
                     finished run) the views show and the actions measure
    Table 1          SD vs SD+TI reconstruction and editability with the difference, each prompt
                     as the user wrote it, and the curve over checkpoints (steps experiment)
    Compare          any two evaluations side by side, with Δ
    Study            every experiment report: steps, init words, seeds, regularisers (Table 1 for
                     each method) and the synthesis batches, each with its table and grid

e evaluates the picked word, x runs the steps experiment over its run's checkpoints, i/s/r
run the initializer-word, seed and regulariser sweeps, y the section-5 synthesis batches;
v cycles the views.  Everything shown is read from disk through engine.store.records (and from
the jobs' results while the disk has nothing newer).
"""

from __future__ import annotations

import json

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Label, Select, Static, TabbedContent, TabPane, Tabs

from engine.store.records import (
    curve_points,
    eval_tables,
    experiment_reports,
    latest_done_run,
    parse_pin,
    probe_curve,
    report_of_result,
    steps_curves,
)
from engine.store.words import BEST, read_record
from tistudio.formatting import escape
from tistudio.messages import Changes, JobsChanged, LibraryChanged, MetricsChanged, RunSubmitted
from tistudio.screens.base import StudioScreen
from tistudio.widgets.study import CompareView, StudyView
from tistudio.widgets.table1 import Table1View, table_for, with_job_results

METRIC_JOBS = ("eval", "experiment")
LATEST = "latest"  # the run picker's first choice: the concept's latest finished run, final word
VIEWS = ("view-table", "view-compare", "view-study")
VIEW_FOCUS = {"view-table": "#table1", "view-compare": "#compare", "view-study": "#study-table"}
JOB_NAMES = {"steps": "steps experiment", "init": "initializer-word experiment", "seeds": "seed experiment",
             "regularize": "regulariser experiment", "synthesis": "synthesis batches"}


def job_name(job: dict) -> str:
    """`evaluation`, `seed experiment` …: a metric job as the jobs line names it."""
    if job.get("kind") == "eval":
        return "evaluation"
    kind = (job.get("params") or {}).get("kind") if isinstance(job.get("params"), dict) else None
    return JOB_NAMES.get(kind, f"{kind or ''} experiment".strip())


class MetricsScreen(StudioScreen):
    MODE = "metrics"
    HOME_FOCUS = "#table1"
    AUTO_FOCUS = "#table1"
    BINDINGS = [
        Binding("e", "evaluate", "Eval"),
        Binding("x", "steps_experiment", "Steps"),
        Binding("i", "init_experiment", "Init"),
        Binding("s", "seeds_experiment", "Seeds"),
        Binding("r", "regularize_experiment", "Reg."),
        Binding("y", "synthesis", "Synth."),
        Binding("v", "next_view", "View"),
        Binding("c", "choose_concept", "Concept", show=False),
        Binding("p", "choose_run", "Run", show=False),
    ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._concepts: tuple = ()
        self._pins: tuple = ()
        self._drawn: tuple | None = None
        self.table: dict | None = None
        self.curve: dict | None = None
        self._jobs_seen: tuple | None = None
        self._ours: set[str] = set()  # metric jobs this screen started: shown when they finish
        self._shown_done: set[str] = set()
        self._prefer_report: str | None = None

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="metrics-top"):
            yield Label("Concept", classes="gen-label")
            yield Select([], id="metrics-concept", compact=True, prompt="(none)")
            yield Label("Run", classes="gen-label-s")
            yield Select([("latest finished run", LATEST)], value=LATEST, allow_blank=False, id="metrics-run",
                         compact=True)
        with TabbedContent(id="metrics-views", initial="view-table"):
            with TabPane("Table 1", id="view-table"):
                yield Table1View(id="metrics-body")
            with TabPane("Compare", id="view-compare"):
                yield CompareView(id="compare-view")
            with TabPane("Study", id="view-study"):
                yield StudyView(id="study-view")
        yield Static("", id="metrics-jobs")

    def concept(self) -> str | None:
        value = self.query_one("#metrics-concept", Select).value
        return value if isinstance(value, str) else None

    def picked(self) -> tuple[str | None, int | None]:
        """The run picker's choice as (run, step): (None, None) for the latest finished run; NAME@RUN:best
        as the step the run's record names its best."""
        value = self.query_one("#metrics-run", Select).value
        if not isinstance(value, str) or value == LATEST:
            return None, None
        _, run, step = parse_pin(value)
        if step == BEST:
            path = self._concept_dir(self.concept())
            best = (read_record(path / "runs" / run) if path and run else None) or {}
            step = (best.get("best") or {}).get("step")
        return run, step

    # -- state → screen

    def redraw(self, changes: Changes) -> None:
        if changes.any(LibraryChanged):
            self._refresh_concepts()
        for submitted in changes.of(RunSubmitted):
            if submitted.origin == self.MODE:
                self._ours.add(submitted.run_id)
        jobs = self._metric_jobs()
        for job in jobs:
            if job.get("status") in ("queued", "running"):
                self.app.watch_run(job["id"])
        seen = tuple((j.get("id"), j.get("status")) for j in jobs)
        if changes.any(LibraryChanged, MetricsChanged) or (changes.any(JobsChanged) and seen != self._jobs_seen):
            self._jobs_seen = seen
            self._show_finished(jobs)
            self._load()
        self._draw_jobs(jobs)

    def _show_finished(self, jobs: list[dict]) -> None:
        """A job this screen started has finished: show what it made (its report, its Table 1)."""
        for job in jobs:
            if job["id"] not in self._ours or job["id"] in self._shown_done or job.get("status") != "done":
                continue
            self._shown_done.add(job["id"])
            if job.get("kind") == "eval":
                self.show_view("view-table")
                continue
            report = report_of_result(job.get("result"))
            kind = (job.get("params") or {}).get("kind")
            if report is not None and kind != "steps":
                self._prefer_report = report.id
                self.show_view("view-study")

    def _refresh_concepts(self) -> None:
        self._concepts = self.sync_concept_select(self.query_one("#metrics-concept", Select), self._concepts)
        self._refresh_pins()

    def _refresh_pins(self) -> None:
        """The run picker offers the concept's saved words: NAME@RUN (final) and NAME@RUN:STEP."""
        path = self._concept_dir(self.concept())
        try:
            pins = tuple(self.app.library.summary(self.concept()).pins()) if path else ()
        except Exception:  # noqa: BLE001 - a damaged library must not break drawing
            pins = ()
        if pins == self._pins:
            return
        self._pins = pins
        select = self.query_one("#metrics-run", Select)
        chosen = select.value
        select.set_options([("latest finished run", LATEST)] + [(pin, pin) for pin in reversed(pins)])
        select.value = chosen if chosen in pins else LATEST

    def _metric_jobs(self) -> list[dict]:
        name = self.concept()
        return [j for j in self.app.state.jobs if j.get("kind") in METRIC_JOBS and j.get("concept") == name]

    def _load(self) -> None:
        name = self.concept()
        path = self._concept_dir(name)
        tables, curves, reports = [], [], []
        if path is not None:
            tables, curves, reports = eval_tables(path), steps_curves(path), experiment_reports(path)
            tables, reports = with_job_results(tables, reports, self._metric_jobs())
        run, step = self.picked()
        table = table_for(tables, run, step)
        chosen_curves = [c for c in curves if run is None or c.get("run") == run]
        curve = chosen_curves[-1] if chosen_curves else None
        if curve is None and run is None:
            curve = next((j.get("result") for j in reversed(self._metric_jobs())
                          if isinstance(j.get("result"), dict) and curve_points(j["result"])), None)
        if curve is None and path is not None:  # no steps experiment: the run's probes, measured while it trained
            curve = probe_curve(path, run)
        self.query_one(CompareView).set_tables(tables)
        prefer, self._prefer_report = self._prefer_report, None
        self.query_one(StudyView).set_reports(reports, prefer)
        key = (name, run, step, json.dumps(table, sort_keys=True, default=str)[:100000] if table else None,
               json.dumps(curve, sort_keys=True, default=str)[:100000] if curve else None)
        if key == self._drawn:
            return
        self._drawn = key
        self.table, self.curve = table, curve
        view = self.query_one(Table1View)
        view.show(name, table, run, step, (table or {}).get("token") or self._token(name))
        view.set_curve(curve_points(curve) if curve else [],
                       "the run's probes" if curve and curve.get("source") == "probes" else "")

    def _token(self, name: str | None) -> str | None:
        try:
            return self.app.library.get(name).token if name else None
        except Exception:  # noqa: BLE001 - only a label
            return None

    def _draw_jobs(self, jobs: list[dict]) -> None:
        line = self.query_one("#metrics-jobs", Static)
        active = [j for j in jobs if j.get("status") in ("queued", "running")]
        if active:
            parts = []
            for j in active:
                track = self.app.state.tracks.get(j["id"])
                progress = f" {track.progress:.0%}" if track and track.progress is not None else ""
                parts.append(f"{job_name(j)} {j['id']}: {j.get('status')}{progress}")
            line.update(" · ".join(parts))
            return
        failed = [j for j in jobs[-1:] if j.get("status") == "failed"]
        if failed:
            line.update(f"[red]last {job_name(failed[0])} failed: {escape(failed[0].get('error') or '')}[/red]")
        else:
            line.update("e evaluate · x steps · i init words · s seeds · r regularisers · y synthesis · v view")

    @on(Select.Changed, "#metrics-concept")
    def _concept_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self.app.selected_concept = event.value
            self._refresh_pins()
            self._load()
            self._draw_jobs(self._metric_jobs())

    @on(Select.Changed, "#metrics-run")
    def _run_changed(self) -> None:
        self._load()

    def show_view(self, view: str) -> None:
        """Show one of the views (Table 1, Compare, Study) with the focus on its table.  The focus
        moves first: a focused table left in a hidden view would pull its view back."""
        tabs = self.query_one("#metrics-views", TabbedContent)
        if tabs.active == view:
            return
        tabs.query_one(Tabs).focus()
        tabs.active = view
        self.call_after_refresh(self.query_one(VIEW_FOCUS[view]).focus)

    def action_next_view(self) -> None:
        tabs = self.query_one("#metrics-views", TabbedContent)
        self.show_view(VIEWS[(VIEWS.index(tabs.active) + 1) % len(VIEWS)] if tabs.active in VIEWS else VIEWS[0])

    # -- user → engine

    def _concept_dir(self, name: str | None):
        """The concept's folder in the library, or None (no name, or it is gone meanwhile)."""
        from engine.errors import UserError

        if not name:
            return None
        try:
            return self.app.library.get(name).path
        except (UserError, OSError):
            return None

    def _measuring(self) -> dict:
        """How every evaluation and experiment measures: the model, CLIP, images per set."""
        params = {**self.app.model_params(), **self.app.eval_params}
        if self.app.clip:
            params["clip"] = self.app.clip
        if self.app.eval_images:
            params["images"] = self.app.eval_images
        return params

    def _word(self) -> dict | None:
        """The picked word as params ({"run", "step"}); None (and a notice) if there is none."""
        name = self.concept()
        if not name:
            self.notify("Choose a concept first.", severity="warning")
            return None
        run, step = self.picked()
        if run is None:
            path = self._concept_dir(name)
            run = latest_done_run(path) if path is not None else None
            if not run:
                self.notify(f"{name} has no finished training run yet; train it on 2 Train (or pick a saved "
                            "step with p).", severity="warning")
                return None
        return {"run": run, **({"step": step} if step is not None else {})}

    def _submit(self, kind: str, params: dict) -> None:
        self.app.bridge.submit(kind, self.concept(), params, origin=self.MODE)

    def action_evaluate(self) -> None:
        word = self._word()
        if word is not None:
            self._submit("eval", {**word, **self._measuring()})

    def action_steps_experiment(self) -> None:
        word = self._word()
        if word is not None:
            self._submit("experiment", {"kind": "steps", "run": word["run"], **self._measuring()})

    def action_init_experiment(self) -> None:
        self._ask("init")

    def action_seeds_experiment(self) -> None:
        self._ask("seeds")

    def action_regularize_experiment(self) -> None:
        self._ask("regularize")

    def action_synthesis(self) -> None:
        """Section 5: the picked word in the study's new scenes or styles; the grid shows on Study."""
        self._ask("synthesis")

    def _ask(self, kind: str) -> None:
        from tistudio.screens.experiment_modal import ExperimentModal

        name = self.concept()
        if not name:
            self.notify("Choose a concept first.", severity="warning")
            return
        try:
            concept = self.app.library.get(name)
        except Exception as exc:  # noqa: BLE001
            self.notify(str(exc), severity="error")
            return
        word = None
        if kind == "synthesis":
            word = self._word()
            if word is None:
                return
        elif not concept.images:
            self.notify(f"{name} has no training images; add some on 1 Library (e).", severity="warning")
            return
        values = {"init": concept.init, "seeds": "0, 1, 2", "regularize": "none, init-l2, norm, directional, cross"}
        steps = (self.app.config.commands.get("train") or {}).get("steps", 2000)
        target = f"{name}@{word['run']}" + (f":{word['step']}" if "step" in word else "") if word else ""

        def done(params: dict | None) -> None:
            if params is not None:  # the dialog's settings (e.g. images per prompt) win over the defaults
                self._submit("experiment", {**self._measuring(), **params, **(word or {})})

        self.app.push_screen(ExperimentModal(kind, name, values=values.get(kind, ""), steps=steps,
                                             images=self.app.eval_images or 2, target=target), done)

    def action_choose_concept(self) -> None:
        self.query_one("#metrics-concept", Select).focus()

    def action_choose_run(self) -> None:
        self.query_one("#metrics-run", Select).focus()

