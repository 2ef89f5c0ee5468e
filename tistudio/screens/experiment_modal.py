"""The dialog that starts one of the study's experiments from the Metrics screen.

    init        one run per initializer word (section 4.2: Building vs Tower)
    seeds       one run per training seed (section 4.3)
    regularize  the trade-off: one run per method (and seed), with the SD row: Table 1 for each
                method, its mean over the seeds, and the frontier
    synthesis   section 5's prompt batches: the learned word in new scenes or styles

The sweeps train their runs together (one UNet call per step) and then measure each; the
dialog asks for what varies and the few training settings worth changing here (steps, seed,
the regulariser's weight).  `experiment_params` turns the fields into the experiment job's
params (ValueError naming the field that is wrong), so the rules are testable without a screen.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Button, Input, Label, Static

from engine.errors import UserError
from engine.settings.train import parse_method
from tistudio.screens.modals import _Dialog
from tistudio.widgets.forms import FieldRow, parse_float, parse_int, split_list

SWEEPS = ("init", "seeds", "regularize")
TITLES = {"init": "Initializer words (section 4.2)", "seeds": "Training seeds (section 4.3)",
          "regularize": "The trade-off: every method on one frontier", "synthesis": "Synthesis batches (section 5)"}
VALUES_LABEL = {"init": "Words", "seeds": "Seeds", "regularize": "Methods"}
HINTS = {
    "init": "One run per word, trained together, then measured side by side (the paper: Building vs Tower).",
    "seeds": "One run per training seed: how much of a result is luck.",
    "regularize": "none is the paper's method; init-l2, norm and directional keep the word editable; cross "
                  "starts it from the encoder's output (Pang et al.), per-layer gives every UNet layer its own "
                  "vector (P+); join parts with + (cross+per-layer). init-l2:0.003 gives one method its own weight; "
                  "else the Reg. weight, or each method's default. Several seeds (0,1,2): each method at each.",
    "synthesis": "The learned word in the study's new scenes (objects) or on new subjects (styles), SD beside "
                 "SD+TI with the same seeds; every image keeps its metadata.",
}


def experiment_params(kind: str, values: str = "", steps: str = "", seed: str = "", reg_weight: str = "",
                      images: str = "") -> dict:
    """The experiment job's params for the dialog's fields; ValueError naming the wrong one."""
    if kind == "synthesis":
        return {"kind": kind, "images": parse_int(images, "Images per prompt", 1)}
    if kind not in SWEEPS:
        raise ValueError(f"unknown experiment {kind!r}")
    items = split_list(values)
    if not items:
        raise ValueError(f"{VALUES_LABEL[kind]}: give at least one, separated by commas")
    if kind == "seeds":
        items = [parse_int(v, "Seeds") for v in items]
    if kind == "regularize":
        for item in items:
            try:
                parse_method(item)
            except UserError as exc:
                raise ValueError(f"Methods: {exc}") from None
    count = parse_int(steps, "Steps", 1)
    # Only the final word is measured: save it once, and no previews (the grid shows every run).
    params = {"kind": kind, "values": list(dict.fromkeys(items)), "steps": count, "save_every": count,
              "preview_every": 0}
    seeds = split_list(seed) if kind == "regularize" else []
    if len(seeds) > 1:  # every method at each seed: means and standard errors on the frontier
        params["seeds"] = list(dict.fromkeys(parse_int(s, "Seed") for s in seeds))
    elif kind != "seeds":
        params["seed"] = parse_int(seed, "Seed")
    if kind == "regularize" and reg_weight.strip():
        params["reg_weight"] = parse_float(reg_weight, "Reg. weight", minimum=0.0)
    return params


class ExperimentModal(_Dialog[dict | None]):
    """Ask for an experiment's settings; `dismiss(params)` with the job's params."""

    def __init__(self, kind: str, concept: str, *, values: str = "", steps: int = 2000, images: int = 2,
                 target: str = ""):
        super().__init__()
        self.kind, self.concept = kind, concept
        self._values, self._steps, self._images, self._target = values, steps, images, target

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"{self.concept}: {TITLES[self.kind]}", id="dialog-title")
            if self.kind == "synthesis":
                yield FieldRow("Word", Static(self._target or "(the latest finished run)", markup=False))
                yield FieldRow("Images/prompt", Input(str(self._images), id="images", compact=True, type="integer"))
            else:
                yield FieldRow(VALUES_LABEL[self.kind], Input(self._values, id="values", compact=True))
                yield FieldRow("Steps", Input(str(self._steps), id="steps", compact=True, type="integer"))
                if self.kind != "seeds":
                    yield FieldRow("Seed", Input("0", id="seed", compact=True, type="integer"))
                if self.kind == "regularize":
                    yield FieldRow("Reg. weight", Input("", id="reg_weight", compact=True, placeholder="(default)"))
            yield Static(HINTS[self.kind], classes="dialog-hint", markup=False)
            yield Static("", classes="dialog-error", id="error")
            yield self.buttons("Start")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def _field(self, key: str) -> str:
        found = self.query(f"#{key}")
        return found.first(Input).value if found else ""

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        try:
            params = experiment_params(self.kind, **{k: self._field(k) for k in ("values", "steps", "seed",
                                                                                   "reg_weight", "images")})
        except ValueError as exc:
            self.query_one("#error", Static).update(str(exc))
            return
        self.dismiss(params)
