"""3 Generate: a prompt (completing the library's tokens) and a negative prompt; seed, steps,
guidance, count; size, sampler, batch size and which saved embeddings to use (NAME@RUN:STEP);
SD on the left and SD+TI on the right, images inline with the paths they were saved at."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Input, Label, Select, Static

from engine.errors import UserError
from engine.settings.jobs import check_job
from engine.settings.samplers import DEFAULT_SAMPLER
from engine.settings.samplers import SAMPLERS as ENGINE_SAMPLERS
from tistudio.formatting import escape
from tistudio.messages import Changes, JobsChanged, LibraryChanged, RunSubmitted
from tistudio.screens.base import StudioScreen
from tistudio.widgets.forms import (
    FieldError,
    PinSuggester,
    TokenSuggester,
    field_for,
    parse_float,
    parse_int,
    parse_optional_int,
    shorten_path,
    split_list,
)
from tistudio.widgets.images import ImagePreview

MODES = [("SD | SD+TI", "compare"), ("SD+TI", "ti"), ("SD", "sd")]
SAMPLERS = [(s.label, s.name) for s in ENGINE_SAMPLERS.values()]
MAX_IMAGES = 16


class GenerateScreen(StudioScreen):
    MODE = "generate"
    HOME_FOCUS = "#gen-results"
    AUTO_FOCUS = "#gen-results"
    BINDINGS = [
        Binding("p", "edit_prompt", "Prompt"),
        Binding("g", "generate", "Generate"),
    ]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_id: str | None = None
        self._drawn: tuple | None = None
        self._tokens: list[str] = []
        self._pins: list[str] = []  # every saved embedding as NAME@RUN[:STEP]

    def compose_body(self) -> ComposeResult:
        with Vertical(id="gen-form"):
            with Horizontal(id="gen-prompt-row"):
                yield Label("Prompt", classes="gen-label")
                yield Input("", id="prompt", compact=True, placeholder="a photo of <sample> on the beach",
                            suggester=TokenSuggester(lambda: self._tokens))
            with Horizontal(id="gen-negative-row"):
                yield Label("Negative", classes="gen-label")
                yield Input("", id="negative", compact=True, placeholder="(none) what the images should not show",
                            suggester=TokenSuggester(lambda: self._tokens))
            with Horizontal(id="gen-params"):
                yield Label("Seed", classes="gen-label-s")
                yield Input("0", id="seed", compact=True, type="integer")
                yield Label("Steps", classes="gen-label-s")
                yield Input("25", id="steps", compact=True, type="integer")
                yield Label("CFG", classes="gen-label-s")
                yield Input("7.5", id="guidance", compact=True)
                yield Label("N", classes="gen-label-s")
                yield Input("2", id="count", compact=True, type="integer")
                yield Select(MODES, value="compare", allow_blank=False, id="mode", compact=True)
                yield Button("Generate", id="go", variant="primary", compact=True)
            with Horizontal(id="gen-options"):
                yield Label("W", classes="gen-label-s")
                yield Input("", id="width", compact=True, type="integer", placeholder="auto")
                yield Label("H", classes="gen-label-s")
                yield Input("", id="height", compact=True, type="integer", placeholder="auto")
                yield Select(SAMPLERS, value=DEFAULT_SAMPLER, allow_blank=False, id="sampler", compact=True)
                yield Label("Batch", classes="gen-label-s")
                yield Input("4", id="batch_size", compact=True, type="integer")
                yield Label("Use", classes="gen-label-s")
                yield Input("", id="uses", compact=True, placeholder="(latest) NAME@RUN:STEP, …",
                            suggester=PinSuggester(lambda: self._pins))
        yield Static("", id="gen-status")
        with Horizontal(id="gen-columns"):
            with Vertical(id="col-sd", classes="gen-col"):
                yield Label("SD", classes="gen-col-title")
            with Vertical(id="col-ti", classes="gen-col"):
                yield Label("SD+TI", classes="gen-col-title")
        yield VerticalScroll(Horizontal(Vertical(id="imgs-sd", classes="gen-imgs"),
                                        Vertical(id="imgs-ti", classes="gen-imgs"), id="gen-grid"),
                             id="gen-results")

    # -- state → screen

    def redraw(self, changes: Changes) -> None:
        if changes.any(LibraryChanged):
            self._load_tokens()
        for submitted in changes.of(RunSubmitted):
            if submitted.origin == self.MODE:
                self.run_id = submitted.run_id
        if self.run_id is None and changes.any(JobsChanged):
            gens = self.app.state.jobs_of("generate")
            if gens:
                self.run_id = gens[-1]["id"]
        if self.run_id:
            self.app.watch_run(self.run_id)
        self._draw()

    def on_screen_resume(self) -> None:
        hint = getattr(self.app, "prompt_hint", None)
        if hint:
            self.app.prompt_hint = None
            prompt = self.query_one("#prompt", Input)
            prompt.value = hint
        super().on_screen_resume()

    def _load_tokens(self) -> None:

        try:
            summaries = self.app.library.summaries()
        except Exception:  # noqa: BLE001 - a damaged library must not break drawing
            summaries = []
        concepts = [s.concept for s in summaries]
        self._tokens = [c.token for c in concepts]
        self._pins = [pin for s in summaries for pin in s.pins()]
        prompt = self.query_one("#prompt", Input)
        if not prompt.value and concepts:
            chosen = next((c for c in concepts if c.name == self.app.selected_concept), concepts[0])
            prompt.placeholder = (f"a photo of {chosen.token} on the beach" if chosen.property == "object"
                                  else f"a house in the style of {chosen.token}")

    def _draw(self) -> None:
        state = self.app.state
        track = state.tracks.get(self.run_id) if self.run_id else None
        job = state.job(self.run_id) or {}
        key = (self.run_id, track.version if track else None, job.get("status"), self.app.image_protocol)
        if key == self._drawn:
            return
        self._drawn = key
        status = self.query_one("#gen-status", Static)
        if not self.run_id:
            status.update("p: write a prompt with a concept's token (→ completes it), then enter.")
            self.run_worker(self._show([]), group="gen-images", exclusive=True)
            return
        images = list(track.images) if track else []
        result = (track.result if track else None) or job.get("result") or {}
        if not images and isinstance(result.get("images"), list):
            images = [i for i in result["images"] if isinstance(i, dict) and i.get("path")]
        run_status = (track.status if track and track.status else None) or job.get("status") or "queued"
        prompt = job.get("params", {}).get("prompt") if isinstance(job.get("params"), dict) else None
        prompt = prompt or next((i.get("prompt") for i in images if i.get("prompt")), "")
        folder = shorten_path(Path(images[0]["path"]).parent, self.app.home) if images else ""
        parts = [run_status]
        if run_status in ("queued", "running"):
            expected = (job.get("params") or {}).get("n")
            parts.append(f"{len(images)} image{'s' if len(images) != 1 else ''} so far"
                         + (f" (progress {track.progress:.0%})" if track and track.progress is not None else ""))
            if expected:
                parts[-1] += f" of {expected} per column"
        elif run_status == "failed":
            parts.append(f"[red]{escape((track.error if track else None) or job.get('error') or 'failed')}[/red]")
        parts.insert(1, f"run {self.run_id}")
        if folder:
            parts.append(f"saved in {escape(folder)}/")
        status.update(" · ".join(parts))
        self.run_worker(self._show(images), group="gen-images", exclusive=True)

    async def _show(self, images: list[dict]) -> None:
        for mode in ("sd", "ti"):
            column = self.query_one(f"#imgs-{mode}", Vertical)
            wanted = [i for i in images if (i.get("mode") or "ti") == mode][:MAX_IMAGES]
            have = [w for w in column.query(ImagePreview)]
            if [str(w.path) for w in have] == [i["path"] for i in wanted]:
                continue
            await column.remove_children()
            if not wanted:
                await column.mount(Static("–", classes="gen-empty"))
                continue
            await column.mount_all([
                ImagePreview(i["path"], Path(i["path"]).name, classes="gen-image")
                for i in wanted])

    # -- user → engine

    def action_edit_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_generate()

    @on(Button.Pressed, "#go")
    def _go(self) -> None:
        self.action_generate()

    def params(self) -> dict:
        """The form as job params; ValueError naming the field that is wrong."""
        get = lambda i: self.query_one(f"#{i}", Input).value  # noqa: E731
        prompt = get("prompt").strip() or self.query_one("#prompt", Input).placeholder
        if not prompt:
            raise ValueError("Write a prompt first.")
        n = parse_int(get("count"), "N")
        if n > MAX_IMAGES:
            raise FieldError(f"N must be at most {MAX_IMAGES}", "count")
        params = {
            "prompt": prompt,
            "negative": get("negative").strip(),
            "n": n,
            "seed": parse_int(get("seed"), "Seed"),
            "steps": parse_int(get("steps"), "Steps"),
            "guidance": parse_float(get("guidance"), "CFG"),
            "mode": self.query_one("#mode", Select).value,
            "sampler": self.query_one("#sampler", Select).value,
            "batch_size": parse_int(get("batch_size"), "Batch"),
            "uses": self._uses(get("uses")),
            **self.app.model_params(),
        }
        for key, name in (("width", "Width"), ("height", "Height")):
            size = parse_optional_int(get(key), name)
            if size is not None:
                params[key] = size
        try:
            check_job("generate", params)  # the engine's door, with its words
        except UserError as exc:
            raise FieldError(str(exc), field_for(str(exc), self, {"n": "count"})) from None
        return params

    def _uses(self, text: str) -> list[str]:
        """The pinned embeddings: each one a saved NAME@RUN or NAME@RUN:STEP, one per concept."""
        uses = split_list(text)
        for pin in uses:
            if pin not in self._pins:
                raise ValueError(f"Use: no saved embedding {pin}; write NAME@RUN or NAME@RUN:STEP (→ completes "
                                 "the saved ones), or leave it empty for each concept's latest")
        names = [pin.split("@", 1)[0] for pin in uses]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice:
            raise ValueError(f"Use: {twice} is pinned twice; keep one")
        return uses

    def action_generate(self) -> None:
        try:
            params = self.params()
        except ValueError as exc:
            self.refuse_form(exc, "Generate")
            return
        if not self.query_one("#prompt", Input).value.strip():
            self.query_one("#prompt", Input).value = params["prompt"]
        self.app.bridge.submit("generate", None, params, origin=self.MODE)
