"""The Train screen's New-run form: every training option, read back as job params.

The study's settings come first (steps, lr, seed, batch); the options for a small
card or an unusual run follow (grad accumulation with the effective batch it gives,
low VRAM, init from an existing embedding, several vectors, a regularizer that keeps
the word editable, checkpoint pruning, probes, the deterministic loss, when to stop and which
step is best, compile, deterministic algorithms, resolution, prompt
templates, aspect-ratio buckets, masked loss, an EMA of the word, device).
An empty optional field is left out of the params, so the engine's default applies.

The settings file's `[train]` table (the one `tistudio train` reads) gives the fields
their first values; its keys are the CLI's options, spelt with - or _.
"""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Checkbox, Input, Select, Static

from engine.errors import UserError
from engine.settings.jobs import check_job
from engine.settings.stopping import BEST_RULES
from engine.settings.train import REGULARIZERS
from tistudio.widgets.forms import (
    FieldError,
    FieldRow,
    PathSuggester,
    PinSuggester,
    field_for,
    parse_float,
    parse_int,
    parse_optional_int,
)

# The study's defaults (lr 5e-4, batch 1, AdamW with weight decay 1e-2; 1500-2400 steps recommended;
# saves every 500).
DEFAULTS = {"steps": "2000", "lr": "5e-4", "seed": "0", "batch_size": "1", "grad_accum": "1", "save_every": "500",
            "preview_every": "500", "warmup_steps": "0", "log_every": "10", "weight_decay": "1e-2", "vectors": "1",
            "probe_every": "500", "dloss_every": "25"}
COMPILE_MODES = ("off", "default", "reduce-overhead")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
LR_SCHEDULES = ("constant", "warmup", "cosine")
SELECTS = {"lr_schedule": LR_SCHEDULES, "precision": PRECISIONS, "compile": COMPILE_MODES, "regularize": REGULARIZERS,
           "best_by": BEST_RULES}
CHECKBOXES = ("low_vram", "deterministic", "buckets", "masked_loss")  # on/off: true or false in the settings file
# `tistudio train` options the form has no field for, as the job params they become
HIDDEN_PARAMS = {"center_crop": "center_crop", "flip": "flip_p", "preview_steps": "preview_steps",
                 "probe_images": "probe_images", "probe_edit_images": "probe_edit_images", "probe_steps": "probe_steps"}
SWEEP_ONLY = ("seeds", "inits", "detach")  # CLI-only: the form trains one run


def _choices(values) -> list[tuple[str, str]]:
    return [(v, v) for v in values]


class TrainForm(VerticalScroll):
    """The fields of a new run; `params(home, model)` reads them (ValueError names the wrong one)."""

    def compose(self) -> ComposeResult:
        def field(label: str, key: str, placeholder: str = "", integer: bool = False, suggester=None) -> FieldRow:
            return FieldRow(label, Input(DEFAULTS.get(key, ""), id=key, compact=True, placeholder=placeholder,
                                         type="integer" if integer else "text", suggester=suggester))

        yield FieldRow("Concept", Select([], id="concept", compact=True, prompt="(none)"))
        yield field("Steps", "steps", integer=True)
        yield field("LR", "lr")
        yield field("Seed", "seed", integer=True)
        yield field("Batch", "batch_size", integer=True)
        yield field("Grad accum", "grad_accum", integer=True)
        yield FieldRow("Eff. batch", Static("", id="effective-batch"))
        yield FieldRow("Low VRAM", Checkbox("(l)", id="low_vram", compact=True))
        yield field("Init word", "init", "(concept's)")
        yield field("Init from", "init_from", "(init word)", suggester=PinSuggester(self._pins, paths=True))
        yield field("Vectors", "vectors", integer=True)
        yield FieldRow("Regularize", Select(_choices(REGULARIZERS), value="none", allow_blank=False, id="regularize",
                                            compact=True))
        yield field("Reg. weight", "reg_weight", "(method's)")
        yield field("Log every", "log_every", integer=True)
        yield field("Save every", "save_every", integer=True)
        yield field("Keep ckpts", "keep_checkpoints", "(all)", integer=True)
        yield field("Preview every", "preview_every", integer=True)
        yield field("Preview text", "preview_prompt", "(default)")
        yield field("Probe every", "probe_every", integer=True)
        yield field("Dloss every", "dloss_every", integer=True)
        yield field("Stop when", "stop_when", "(never)")
        yield FieldRow("Best by", Select(_choices(BEST_RULES), value="tradeoff", allow_blank=False, id="best_by",
                                         compact=True))
        yield FieldRow("Schedule", Select(_choices(LR_SCHEDULES), value="constant", allow_blank=False,
                                          id="lr_schedule", compact=True))
        yield field("Warmup", "warmup_steps", integer=True)
        yield field("Weight decay", "weight_decay")
        yield FieldRow("Precision", Select(_choices(PRECISIONS), value="auto", allow_blank=False, id="precision",
                                           compact=True))
        yield FieldRow("Compile", Select(_choices(COMPILE_MODES), value="off", allow_blank=False, id="compile",
                                         compact=True))
        yield FieldRow("Deterministic", Checkbox("", id="deterministic", compact=True))
        yield field("Resolution", "resolution", "(model's)", integer=True)
        yield field("Templates", "templates", "(the study's)", suggester=PathSuggester())
        yield FieldRow("Buckets", Checkbox("(any aspect ratio)", id="buckets", compact=True))
        yield FieldRow("Masked loss", Checkbox("(images' masks)", id="masked_loss", compact=True))
        yield field("EMA decay", "ema", "(off)")
        yield field("Device", "device", "(auto)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hidden_params: dict = {}  # settings-file values for options without a field

    def on_mount(self) -> None:
        config = getattr(self.app, "config", None)
        problems = self.apply_defaults(config.commands.get("train", {}) if config else {})
        if problems:
            where = config.path if config is not None and config.path else "the settings file"
            self.notify(f"{where}: [train] {'; '.join(problems)}", severity="warning", title="Settings")
        self._show_effective_batch()

    def apply_defaults(self, table: dict) -> list[str]:
        """Fill the fields from a settings `[train]` table; returns what could not be used."""
        problems = []
        for key, value in table.items():
            name = str(key).replace("-", "_")
            if name in SELECTS:
                if value not in SELECTS[name]:
                    problems.append(f"{key} = {value!r} is not one of {', '.join(SELECTS[name])}")
                    continue
                self.query_one(f"#{name}", Select).value = value
            elif name in CHECKBOXES:
                if not isinstance(value, bool):
                    problems.append(f"{key} must be true or false")
                    continue
                self.query_one(f"#{name}", Checkbox).value = value
            elif name in HIDDEN_PARAMS:
                self.hidden_params[HIDDEN_PARAMS[name]] = value
            elif name in SWEEP_ONLY:
                problems.append(f"{key} is for `tistudio train` only (the form trains one run)")
            elif self.query(f"#{name}").filter("Input"):
                self.query_one(f"#{name}", Input).value = str(value)
            else:
                problems.append(f"{key} is not a train option")
        return problems

    def _text(self, key: str) -> str:
        return self.query_one(f"#{key}", Input).value.strip()

    def _pins(self) -> list[str]:
        try:
            return [pin for summary in self.app.library.summaries() for pin in summary.pins()]
        except OSError:
            return []

    @on(Input.Changed, "#batch_size, #grad_accum")
    def _show_effective_batch(self) -> None:
        hint = self.query_one("#effective-batch", Static)
        try:
            batch, accum = parse_int(self._text("batch_size"), "Batch", 1), parse_int(self._text("grad_accum"),
                                                                                      "Grad accum", 1)
        except ValueError:
            hint.update("–")
            return
        hint.update(f"{batch * accum}" + (f" ({batch}×{accum})" if accum > 1 else ""))

    def toggle_low_vram(self) -> bool:
        """Flip Low VRAM (key l); returns the new value."""
        box = self.query_one("#low_vram", Checkbox)
        box.value = not box.value
        self.scroll_to_widget(box, animate=False)
        return box.value

    def params(self, home: Path, model: str | None) -> dict:
        """The form as job params for `model`, checked by the engine's own door
        (engine.settings.jobs); FieldError naming the field that is wrong, with the engine's words."""
        params = self._read()
        params["model"] = model
        try:
            check_job("train", params)
        except UserError as exc:
            raise FieldError(str(exc), field_for(str(exc), self)) from None
        return params

    def _read(self) -> dict:
        """The fields as typed values (whether they are good values is the engine's question)."""
        text = self._text
        params = {
            "steps": parse_int(text("steps"), "Steps"),
            "lr": parse_float(text("lr"), "Learning rate"),
            "seed": parse_int(text("seed"), "Seed"),
            "batch_size": parse_int(text("batch_size"), "Batch size"),
            "grad_accum": parse_int(text("grad_accum"), "Grad accum"),
            "low_vram": self.query_one("#low_vram", Checkbox).value,
            "vectors": parse_int(text("vectors"), "Vectors"),
            "log_every": parse_int(text("log_every"), "Log every"),
            "save_every": parse_int(text("save_every"), "Save every"),
            "preview_every": parse_int(text("preview_every"), "Preview every"),
            "probe_every": parse_int(text("probe_every"), "Probe every"),
            "dloss_every": parse_int(text("dloss_every"), "Dloss every"),
            "best_by": self.query_one("#best_by", Select).value,
            "lr_schedule": self.query_one("#lr_schedule", Select).value,
            "regularize": self.query_one("#regularize", Select).value,
            "reg_weight": parse_float(text("reg_weight"), "Reg. weight") if text("reg_weight") else 0.0,
            "warmup_steps": parse_int(text("warmup_steps"), "Warmup steps"),
            "weight_decay": parse_float(text("weight_decay"), "Weight decay"),
            "precision": self.query_one("#precision", Select).value,
            "compile": self.query_one("#compile", Select).value,
            "deterministic": self.query_one("#deterministic", Checkbox).value,
            "buckets": self.query_one("#buckets", Checkbox).value,
            "masked_loss": self.query_one("#masked_loss", Checkbox).value,
            **self.hidden_params,
        }
        optional = {
            "init": text("init") or None,
            "init_from": self._init_from(text("init_from")),
            "keep_checkpoints": parse_optional_int(text("keep_checkpoints"), "Keep checkpoints"),
            "preview_prompt": text("preview_prompt") or None,
            "stop_when": text("stop_when") or None,
            "resolution": parse_optional_int(text("resolution"), "Resolution"),
            "templates": read_templates(text("templates")) if text("templates") else None,
            "ema": parse_float(text("ema"), "EMA decay") if text("ema") else None,
            "device": text("device") or None,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        return params

    def _init_from(self, value: str) -> str | None:
        """A saved embedding (NAME@RUN or NAME@RUN:STEP) as it is, or a file as an absolute path
        (the engine runs in another folder)."""
        if not value:
            return None
        if "@" in value:
            if value not in self._pins():
                raise ValueError(f"Init from: no saved embedding {value}; write NAME@RUN or NAME@RUN:STEP of a "
                                 "run on 2 Train (→ completes them), or a file")
            return value
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"Init from: {value} is not a file; give an embedding file or NAME@RUN:STEP")
        return str(path.resolve())


def read_templates(path_text: str) -> list[str]:
    """A templates file: one prompt per line with one {} where the token goes and {caption} where
    the image's caption does, or A1111's [name] and [filewords] (# comments skipped; each line's {}
    is the engine's check)."""
    from engine.settings.prompts import load_templates

    try:
        return load_templates(Path(path_text).expanduser())
    except UserError as exc:
        raise FieldError(f"Templates: {exc}", "templates") from None
