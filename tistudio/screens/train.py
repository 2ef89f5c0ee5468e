"""2 Train: the run form (the study's defaults), start/resume/cancel, and the live view of a
run: its facts (family, vectors, effective batch, regularizer), loss (raw and smoothed) and
beside it the vector's norm and cosine to its initializer, VRAM, steps/s, ETA, progress, the
latest preview, the queue and past runs.  Everything shown comes from the run's events, so a run started before the
studio opened shows its whole history and then follows live."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, DataTable, Input, Select, Static

from tistudio.formatting import device_memory, engine_workers, escape, short_when, watch_cells
from tistudio.messages import Changes, EngineChanged, JobsChanged, LibraryChanged, RunSubmitted, StatusChanged
from tistudio.screens.base import StudioScreen
from tistudio.state import is_active
from tistudio.widgets.run_view import STATUS_MARK, RunView
from tistudio.widgets.train_form import TrainForm

RESUMABLE = ("failed", "cancelled", "interrupted")
RUN_COLUMNS = (("when", "Created"), ("concept", "Concept"), ("status", "Status"), ("step", "Step"), ("best", "Best"),
               ("stopped", "Stopped"))
COMPACT_WIDTH = 90  # below this many columns the vector chart and the preview share one place (v flips)


class TrainScreen(StudioScreen):
    MODE = "train"
    HOME_FOCUS = "#runs"
    AUTO_FOCUS = "#runs"
    BINDINGS = [
        Binding("s", "start", "Start"),
        Binding("r", "resume", "Resume"),
        Binding("c", "cancel_run", "Cancel run"),
        Binding("l", "toggle_low_vram", "Low VRAM"),
        Binding("f", "edit_form", "Form", show=False),
        Binding("v", "toggle_beside_loss", "Vector/preview", show=False),
        Binding("b", "export_tensorboard", "TensorBoard", show=False),
    ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_id: str | None = None
        self.pinned = False  # the user chose a run: do not jump to another on our own
        self._drawn: tuple | None = None
        self._runs_sig: tuple | None = None
        self._concepts: tuple = ()
        self.run_view = RunView(self)  # draws the run into the live column's widgets
        self.preview_beside_loss = False  # compact layout: the preview, not the vector chart, beside the loss

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="train-body"):
            with Vertical(id="train-form") as form:
                form.border_title = "New run"
                yield TrainForm(id="train-fields")
                with Horizontal(id="train-buttons"):
                    yield Button("Start", id="start", variant="primary", compact=True)
                    yield Button("Resume", id="resume", compact=True)
                    yield Button("Cancel", id="cancel", variant="error", compact=True)
            with Vertical(id="train-live"):
                yield from RunView.compose()
                yield Static("", id="vram-devices")
                runs = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
                runs.border_title = "Queue and past runs"
                yield runs

    def on_mount(self) -> None:
        runs = self.query_one("#runs", DataTable)
        for key, label in RUN_COLUMNS:
            runs.add_column(label, key=key)
        super().on_mount()

    # -- state → screen

    def redraw(self, changes: Changes) -> None:
        if changes.any(LibraryChanged):
            self._refresh_concepts()
        ours = [c for c in changes.of(RunSubmitted) if c.origin == self.MODE]
        for submitted in ours:
            self.run_id, self.pinned = submitted.run_id, False
        if ours or changes.any(JobsChanged, EngineChanged):
            self._refresh_runs()
        self._pick_run()
        self._draw_run()
        if changes.any(StatusChanged, JobsChanged):
            self._draw_devices()

    def _draw_devices(self) -> None:
        """With several engine workers (one per device): each device, its memory and its job."""
        workers = engine_workers(self.app.state.status)
        line = self.query_one("#vram-devices", Static)
        line.display = len(workers) > 1
        if len(workers) > 1:
            parts = []
            for worker in workers:
                job = worker.get("job")
                doing = f"{worker.get('kind') or 'job'} {worker.get('concept') or ''} {job}".replace("  ", " ") \
                    if job else worker.get("state") or "idle"
                speed = f" {worker['steps_per_s']:.2f} it/s" if isinstance(worker.get("steps_per_s"), (int, float)) \
                    and job else ""
                parts.append(f"{escape(device_memory(worker))} ({escape(doing)}{speed})")
            line.update("VRAM per device: " + " · ".join(parts))

    def _refresh_concepts(self) -> None:
        self._concepts = self.sync_concept_select(self.query_one("#concept", Select), self._concepts)

    def train_jobs(self) -> list[dict]:
        """Running first, then the queue in order, then past runs newest first."""
        state = self.app.state
        jobs = state.jobs_of("train")
        running = [j for j in jobs if j.get("status") == "running"]
        queued = sorted((j for j in jobs if j.get("status") == "queued"),
                        key=lambda j: (j.get("position") or 10 ** 6, j.get("created") or 0))
        past = [j for j in reversed(jobs) if j.get("status") not in ("running", "queued")]
        return running + queued + past

    def _refresh_runs(self) -> None:
        jobs = self.train_jobs()
        sig = tuple((j.get("id"), j.get("status"), j.get("step"), j.get("position"), str(j.get("best")),
                     str(j.get("stopped"))) for j in jobs)
        if sig == self._runs_sig:
            return
        same_rows = self._runs_sig is not None and tuple(s[0] for s in sig) == tuple(s[0] for s in self._runs_sig)
        self._runs_sig = sig
        table = self.query_one("#runs", DataTable)
        rows = [(j["id"], self._cells(j)) for j in jobs]
        if same_rows:
            for run_id, cells in rows:
                for (column, _), value in zip(RUN_COLUMNS, cells):
                    table.update_cell(run_id, column, value, update_width=True)
        else:
            at = None
            if table.row_count and 0 <= table.cursor_row < table.row_count:
                at = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
            keep = self.run_id if self.run_id else at
            table.clear()
            for run_id, cells in rows:
                table.add_row(*cells, key=run_id)
            ids = [r for r, _ in rows]
            if keep in ids:
                table.move_cursor(row=ids.index(keep), animate=False)
        table.border_subtitle = f"{len(jobs)} run{'s' if len(jobs) != 1 else ''}"

    @staticmethod
    def _cells(j: dict) -> tuple:
        status = j.get("status") or "?"
        if status == "queued" and j.get("position"):
            status = f"queued #{j['position']}"
        status = f"{STATUS_MARK.get(j.get('status'), '?')} {status}"
        step = f"{j.get('step') or 0}/{j.get('steps') or '?'}"
        return (short_when(j["id"]), j.get("concept") or "", status, step, *watch_cells(j))

    def _pick_run(self) -> None:
        jobs = self.train_jobs()
        ids = [j["id"] for j in jobs]
        if self.run_id in ids and (self.pinned or is_active(self.app.state.job(self.run_id))):
            pass
        elif jobs and not self.pinned:
            # follow what is running (or next in the queue), else the newest run
            self.run_id = jobs[0]["id"]
        if self.run_id:
            self.app.watch_run(self.run_id)

    def _draw_run(self) -> None:
        state = self.app.state
        job = state.job(self.run_id) or {}
        track = state.tracks.get(self.run_id) if self.run_id else None
        key = (self.run_id, track.version if track else None, job.get("status"), self.app.theme)
        if key == self._drawn:
            return
        self._drawn = key
        device = ((state.status or {}).get("device") or {}).get("device")
        self.run_view.show(self.run_id, job, track, device)

    def on_resize(self) -> None:
        self._place_vector_and_preview()

    def _place_vector_and_preview(self) -> None:
        compact = 0 < self.size.width < COMPACT_WIDTH
        self.run_view.place(compact, self.preview_beside_loss)

    # -- user → engine

    @on(DataTable.RowSelected, "#runs")
    def _run_chosen(self, event) -> None:
        run_id = event.row_key.value if event.row_key else None
        if run_id and run_id != self.run_id:
            self.run_id, self.pinned = run_id, True
            self.app.watch_run(run_id)
            self._draw_run()

    @on(Select.Changed, "#concept")
    def _concept_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self.app.selected_concept = event.value

    def params(self) -> dict:
        """The form as job params; ValueError naming the field that is wrong."""
        return {**self.query_one(TrainForm).params(self.app.home, self.app.model), **self.app.model_params()}

    def action_start(self) -> None:
        concept = self.query_one("#concept", Select).value
        if not isinstance(concept, str):
            self.notify("Choose a concept first (or create one on 1 Library).", severity="warning")
            return
        try:
            params = self.params()
        except ValueError as exc:
            self.refuse_form(exc, "Train")
            return
        self.pinned = False
        self.app.bridge.submit("train", concept, params, origin=self.MODE)

    def action_resume(self) -> None:
        job = self.app.state.job(self.run_id)
        if not job:
            self.notify("Select a run to resume in the runs table.", severity="warning")
            return
        if job.get("status") not in RESUMABLE:
            self.notify(f"Run {job['id']} is {job.get('status')}; only a failed, cancelled or interrupted run "
                        "can be resumed.", severity="warning")
            return
        self.pinned = True
        self.app.bridge.submit(None, resume=job["id"], origin=self.MODE)

    def action_cancel_run(self) -> None:
        job = self.app.state.job(self.run_id)
        if not job or not is_active(job):
            running = self.app.state.running()
            job = running if running and running.get("kind") == "train" else None
        if not job:
            self.notify("No queued or running run to cancel.", severity="warning")
            return
        self.app.bridge.cancel(job["id"])

    def action_export_tensorboard(self) -> None:
        """The selected run's loss, learning rate, norm, probes and previews as TensorBoard logs
        (`tistudio runs export RUN --tensorboard DIR`), into a folder the dialog asks for."""
        from tistudio.screens.modals import TextModal
        from tistudio.widgets.forms import PathSuggester

        run_id = self.run_id
        if not run_id:
            self.notify("Select a run in the runs table first.", severity="warning", title="TensorBoard")
            return

        def done(folder: str | None) -> None:
            if folder:
                self._write_tensorboard(run_id, Path(folder).expanduser())

        self.app.push_screen(TextModal(f"Run {run_id} to TensorBoard", "Folder", str(self.app.home / "tensorboard"),
                                       "Export", hint="Writes FOLDER/<run id>/ (replacing an earlier export); "
                                       "then: tensorboard --logdir FOLDER", suggester=PathSuggester(dirs_only=True)),
                             done)

    @work(thread=True, group="tensorboard")
    def _write_tensorboard(self, run_id: str, folder: Path) -> None:
        from engine.errors import UserError, one_line

        try:
            written = self.app.library.export_tensorboard(run_id, folder)
        except (UserError, OSError) as exc:
            self.app.call_from_thread(self.notify, one_line(exc), severity="error", title="TensorBoard")
            return
        self.app.call_from_thread(self.notify, f"Wrote {len(written)} run{'s' * (len(written) != 1)} to {folder}; "
                                  f"tensorboard --logdir {folder}", title="TensorBoard")

    def action_toggle_low_vram(self) -> None:
        """--low-vram, one key away: gradient checkpointing, for cards with little memory."""
        on = self.query_one(TrainForm).toggle_low_vram()
        self.notify("Low VRAM on: less memory, about half the speed." if on else "Low VRAM off.", title="Train")

    def action_toggle_beside_loss(self) -> None:
        """In a narrow terminal, show the preview instead of the vector chart (or back)."""
        self.preview_beside_loss = not self.preview_beside_loss
        self._place_vector_and_preview()

    def action_edit_form(self) -> None:
        self.query_one("#steps", Input).focus()

    @on(Button.Pressed, "#start")
    def _start_pressed(self) -> None:
        self.action_start()

    @on(Button.Pressed, "#resume")
    def _resume_pressed(self) -> None:
        self.action_resume()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel_run()

