"""What the engine wrote about a concept, read back: its runs, its Table 1s, its experiments.

    summarize(concept)        a ConceptSummary: the concept, its runs, its best SD+TI reconstruction
    library_summaries(home)   one per concept in the library, by name
    eval_tables(concept_dir)  every Table 1 (`runs/<run>/eval/<id>/table.json`), oldest first
    eval_label(table)         `RUN final · eval 01-01 02:00`: one Table 1 in a picker
    compare_tables(a, b)      two Table 1s side by side, each figure with its difference
    written_prompt(row, tok)  a per-prompt row's prompt as the user wrote it, token included
    steps_curves(concept_dir) every steps curve (`experiments/steps-*/curve.json`), oldest first
    probe_curve(concept_dir, run) a run's probes as such a curve (when no steps experiment made one)
    experiment_reports(...)   every experiment report folder (steps, init, seeds, regularize,
                              synthesis, runs), oldest first, as ExperimentReport
    report_of_result(result)  the same for an experiment job's result
    latest_done_run(...)      the id of a concept's newest finished training run
    ConceptSummary.pins()     the NAME@RUN[:STEP] strings that pick one of its saved embeddings
    parse_pin(pin)            NAME@RUN[:STEP] -> (name, run, step)
    gallery(home, ...)        every image the engine made (generations, evaluations, experiments and
                              their grids) as GalleryImage, newest first, filtered by concept, run, kind
    image_metadata(path)      an image's record: its JSON sidecar, else the PNG's own text chunks

The CLI and the studio both read concepts through here, so neither knows where the
engine keeps these files.  No torch and no Textual: cheap enough for a screen redraw.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from engine.store.runs import Run
from engine.store.words import BEST, FINAL_NAME, checkpoint_steps, run_vectors

if TYPE_CHECKING:  # engine.store.library brings numpy and Pillow: the studio imports this module before its first draw
    from engine.store.library import Concept

# Where engine.inversion.metrics writes a Table 1 and engine.worker.experiments a steps curve, under a concept.
EVAL_TABLES = "runs/*/eval/*/table.json"
STEPS_CURVES = "experiments/steps-*/curve.json"
EXPERIMENTS = "experiments"
REPORT_FILES = ("table.json", "curve.json", "synthesis.json")  # what each kind of report writes
TRAIN = "train"
WORD_KINDS = (TRAIN, "import", "merge")  # runs that hold a word (the others measure or inspect one)
INSPECT = "inspect"


def _read_dicts(paths) -> list[dict]:
    """The JSON objects among `paths`, each with `dir` (its folder); unreadable ones skipped
    (a table being written, or damaged by hand, must not hide the others)."""
    found = []
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            data.setdefault("dir", str(path.parent))
            found.append(data)
    return found


def eval_tables(concept_dir: os.PathLike | str) -> list[dict]:
    """Every Table 1 written for the concept, oldest first (by evaluation id)."""
    tables = _read_dicts(sorted(Path(concept_dir).glob(EVAL_TABLES)))
    tables.sort(key=lambda t: (str(t.get("id", "")), t.get("dir", "")))
    return tables


def eval_label(table: dict) -> str:
    """One Table 1 as a picker shows it: the run, which of its embeddings, when it was measured."""
    which = "final" if table.get("final", True) else f"step {table.get('step')}"
    when = str(table.get("id", ""))
    when = f"{when[4:6]}-{when[6:8]} {when[9:11]}:{when[11:13]}" if len(when) >= 13 and when[:8].isdigit() else when
    return f"{table.get('run', '?')} {which} · eval {when}".rstrip()


def table_rows(table: dict) -> dict[str, dict]:
    """A Table 1's rows by model (SD, SD+TI)."""
    return {r.get("model"): r for r in table.get("rows", []) if isinstance(r, dict)}


SCORES = (("reconstruction", "reconstruction"), ("editability", "editability"),
          ("editability_per_image", "edit./image"))


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _delta(a: float | None, b: float | None) -> float | None:
    return b - a if a is not None and b is not None else None


def compare_tables(a: dict, b: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """Two evaluations side by side: (what, A, B, B - A) for each score of each row (SD+TI first:
    the learned words; SD says whether the two were measured alike), then each prompt's SD+TI
    editability, matched by the prompt's template."""
    out = []
    rows_a, rows_b = table_rows(a), table_rows(b)
    for model in ("SD+TI", "SD"):
        for key, name in SCORES:
            x, y = _number(rows_a.get(model, {}).get(key)), _number(rows_b.get(model, {}).get(key))
            if x is not None or y is not None:
                out.append((f"{model} {name}", x, y, _delta(x, y)))
    prompts_b = {p.get("prompt"): p for p in b.get("per_prompt", []) if isinstance(p, dict)}
    token = a.get("token") or b.get("token") or "*"
    for row in a.get("per_prompt", []):
        if not isinstance(row, dict) or row.get("prompt") not in prompts_b:
            continue
        x = _number((row.get("SD+TI") or {}).get("editability"))
        y = _number((prompts_b[row["prompt"]].get("SD+TI") or {}).get("editability"))
        out.append((written_prompt(row, token), x, y, _delta(x, y)))
    return out


def written_prompt(row: dict, token: str | None) -> str:
    """A per-prompt row's prompt as the user wrote it, token included ("a photo of a <cat> on a
    blue background").  Tables from before `written` fill the template with the token."""
    if isinstance(row.get("written"), str) and row["written"]:
        return row["written"]
    template = row.get("prompt")
    if isinstance(template, str) and template:
        return template.replace("{}", token or "*")
    return str(row.get("clip_text") or "")


def steps_curves(concept_dir: os.PathLike | str) -> list[dict]:
    """Every curve the steps experiment wrote for the concept, oldest first."""
    return _read_dicts(sorted(Path(concept_dir).glob(STEPS_CURVES)))


def probe_curve(concept_dir: os.PathLike | str, run: str | None = None) -> dict | None:
    """Run `run`'s probes (default: the newest finished training run's) as a curve over checkpoints,
    the way the steps experiment writes one: what the Metrics screen draws when there is none."""
    from engine.store.history import probes

    run = run or latest_done_run(concept_dir)
    run_dir = Path(concept_dir) / "runs" / str(run)
    if run is None or not run_dir.is_dir():
        return None
    points = [{"step": p["step"], "reconstruction": p.get("reconstruction"), "editability": p.get("editability")}
              for p in probes(run_dir) if p.get("row") != "SD"]
    return {"run": run, "source": "probes", "points": points} if points else None


def curve_points(curve: dict) -> list[dict]:
    """A curve's points (each with a `step`), from a curve.json or an experiment job's result."""
    points = curve.get("points") or curve.get("curve") or []
    return [p for p in points if isinstance(p, dict) and "step" in p]


@dataclass
class ExperimentReport:
    """One experiment as the studio shows it: its kind, its data (the report's JSON or the job's
    result), its folder and grid.  `rows` are what its table lists."""

    id: str
    kind: str  # steps | init | seeds | regularize | synthesis | runs
    data: dict
    dir: Path | None = None

    @property
    def grid(self) -> Path | None:
        """grid.png (prompts x columns), when it is there."""
        candidates = [self.data.get("grid")] + ([self.dir / "grid.png"] if self.dir else [])
        return next((Path(c) for c in candidates if c and Path(c).is_file()), None)

    @property
    def rows(self) -> list[dict]:
        return report_rows(self.kind, self.data)

    @property
    def when(self) -> str:
        """`01-01 03:00` from the id (`KIND-YYYYMMDD-HHMMSS…`)."""
        stamp = self.id.split("-", 1)[1] if "-" in self.id else ""
        if len(stamp) >= 13 and stamp[:8].isdigit():
            return f"{stamp[4:6]}-{stamp[6:8]} {stamp[9:11]}:{stamp[11:13]}"
        return stamp

    def label(self) -> str:
        """`init · 01-01 03:00 · 3 runs`: the report in a picker."""
        rows = [r for r in self.rows if r.get("model") != "SD"]
        what = {"steps": "checkpoint", "synthesis": "prompt"}.get(self.kind, "run")
        count = f"{len(rows)} {what}{'s' if len(rows) != 1 else ''}"
        return " · ".join(p for p in (self.kind, self.when, count) if p)


def report_rows(kind: str, data: dict) -> list[dict]:
    """The rows of a report's table, one shape for every kind: `label`, and for measured kinds
    `reconstruction`, `editability`, `editability_per_image` (and `run`, `model`, `per_prompt`).
    steps: one row per checkpoint; sweeps: the SD row when measured, then one per run;
    synthesis: one per prompt (`prompt`, `images`)."""
    if kind == "steps":
        return [{**p, "label": f"step {p['step']}"} for p in curve_points(data)]
    rows = data.get("rows") if isinstance(data.get("rows"), list) else data.get("runs")
    rows = [r for r in rows or [] if isinstance(r, dict)]
    if kind == "synthesis":
        return [{**r, "label": r.get("prompt") or r.get("template") or ""} for r in rows]
    return [{**r, "label": r.get("label") or r.get("model") or r.get("run") or ""} for r in rows]


def _report_kind(name: str, data: dict) -> str:
    return str(data.get("kind") or name.split("-", 1)[0])


def _sort_key(report: ExperimentReport) -> tuple:
    return (report.id.split("-", 1)[1] if "-" in report.id else report.id, report.id)


def experiment_reports(concept_dir: os.PathLike | str) -> list[ExperimentReport]:
    """Every experiment report under the concept, oldest first.  A folder whose report is not
    written yet (an experiment still running) is left out."""
    reports = []
    root = Path(concept_dir) / EXPERIMENTS
    for folder in sorted(root.glob("*")) if root.is_dir() else []:
        found = _read_dicts(folder / name for name in REPORT_FILES if (folder / name).is_file())
        if found:
            data = found[0]
            reports.append(ExperimentReport(str(data.get("id") or folder.name), _report_kind(folder.name, data),
                                            data, folder))
    reports.sort(key=_sort_key)
    return reports


def report_of_result(result: dict | None) -> ExperimentReport | None:
    """An experiment job's result as a report (None if it is not one)."""
    if not isinstance(result, dict) or not (result.get("dir") or result.get("id")):
        return None
    folder = Path(result["dir"]) if result.get("dir") else None
    name = str(result.get("id") or (folder.name if folder else ""))
    return ExperimentReport(name, _report_kind(name, result), result, folder)


def parse_pin(pin: str) -> tuple[str, str | None, int | str | None]:
    """`NAME@RUN:STEP` -> (NAME, RUN, STEP); `NAME@RUN` -> (NAME, RUN, None); `NAME` -> (NAME, None, None).
    STEP `best` stays "best" (the run's best probed step: engine.store.words.choose_embedding)."""
    name, _, rest = pin.partition("@")
    run, _, step = rest.partition(":")
    return name, run or None, int(step) if step.isdigit() else (BEST if step.lower() == BEST else None)


def ti_reconstruction(table: dict) -> float | None:
    """The SD+TI row's reconstruction score of a Table 1, if it has one."""
    for row in table.get("rows", []):
        if isinstance(row, dict) and row.get("model") == "SD+TI" \
                and isinstance(row.get("reconstruction"), (int, float)):
            return float(row["reconstruction"])
    return None


def is_train_run(run: Run | dict) -> bool:
    """A run that trained the word (not an imported embedding); old records have no kind."""
    return run.get("kind", TRAIN) == TRAIN


def latest_done_run(concept_dir: os.PathLike | str) -> str | None:
    """The id of the concept's newest finished training run, or None."""
    runs = [r for r in Run.of_concept(concept_dir) if r.done and is_train_run(r)]
    return runs[-1].id if runs else None


@dataclass
class ConceptSummary:
    """A concept as a list shows it, read once: the concept, its images, its runs, its best score."""

    concept: Concept
    images: list[Path] = field(default_factory=list)  # its training images when it was read
    runs: list[Run] = field(default_factory=list)  # every run, oldest first

    @property
    def name(self) -> str:
        return self.concept.name

    @property
    def train_runs(self) -> list[Run]:
        return [r for r in self.runs if is_train_run(r)]

    @property
    def done_train_runs(self) -> list[Run]:
        return [r for r in self.train_runs if r.done]

    @property
    def word_runs(self) -> list[Run]:
        """The runs that hold a word of this concept (trained, imported, merged), oldest first."""
        return [r for r in self.runs if r.kind in WORD_KINDS]

    def _word_run(self) -> Run | None:
        """The run whose word the concept uses by default: the newest finished one, else the newest."""
        runs = self.word_runs
        done = [r for r in runs if r.done]
        return (done or runs or [None])[-1]

    @property
    def vectors(self) -> int | None:
        """How many vectors the concept's word has (None before any run)."""
        run = self._word_run()
        return run_vectors(run.record) if run else None

    @property
    def family(self) -> str | None:
        """The model family (sd1, sd2, sdxl) its word was made for, as its run recorded it."""
        run = self._word_run()
        if run is None:
            return None
        model = run.get("model") if isinstance(run.get("model"), dict) else {}
        return model.get("family") or run.params.get("family")

    def latest_inspection(self) -> Run | None:
        """The newest finished `inspect` job (its `result` is the inspector's report)."""
        found = [r for r in self.runs if r.kind == INSPECT and r.done and r.result is not None]
        return found[-1] if found else None

    def pins(self) -> list[str]:
        """Every saved embedding as the string that picks it (generate's `uses`, train's `init_from`):
        `NAME@RUN:STEP` for each checkpoint, `NAME@RUN:best` for a run whose probes named a best
        step, `NAME@RUN` for a finished run's final one."""
        pins = []
        for run in self.runs:
            prefix = f"{self.name}@{run.dir.name}"
            steps = checkpoint_steps(run.dir)
            pins += [f"{prefix}:{step}" for step in steps]
            best = run.get("best")
            if isinstance(best, dict) and best.get("step") in steps:
                pins.append(f"{prefix}:{BEST}")
            if run.done and (run.dir / FINAL_NAME).is_file():
                pins.append(prefix)
        return pins

    @cached_property
    def best_reconstruction(self) -> float | None:
        """The best SD+TI reconstruction of any evaluation (read on first use: it opens every table)."""
        scores = [s for s in map(ti_reconstruction, eval_tables(self.concept.path)) if s is not None]
        return max(scores) if scores else None


def summarize(concept: Concept) -> ConceptSummary:
    return ConceptSummary(concept, concept.images, Run.of_concept(concept.path))


def library_summaries(home: os.PathLike | str) -> list[ConceptSummary]:
    """Every concept in the library at `home`, by name."""
    from engine.store.library import Library

    return [summarize(c) for c in Library(home).list()]


# --- the gallery: every image the engine made ----------------------------------------------------

GALLERY_KINDS = ("generate", "eval", "experiment")


@dataclass(frozen=True)
class GalleryImage:
    """One image the engine wrote, and where it came from."""

    path: Path
    kind: str  # generate | eval | experiment
    concept: str | None  # the concept whose word made it (or that it measures); None for plain SD
    run: str | None  # the run whose word it used (or measured)
    source: str  # the folder it belongs to: an output folder, an evaluation, an experiment
    mode: str  # sd | ti | grid
    mtime: float

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _mode(path: Path) -> str:
    name = path.name
    return "grid" if name in ("grid.png", "compare.png") else name.split("-", 1)[0] if "-" in name else "image"


def _outputs(home: Path) -> list[GalleryImage]:
    """`tistudio generate` folders: each PNG's sidecar names the words it used.  An SD image of a
    side-by-side folder takes its folder's words, so filtering by a concept keeps both sides."""
    images = []
    for folder in sorted(d for d in (home / "outputs").glob("*") if d.is_dir()):
        pngs = sorted(folder.glob("*.png"))
        words = {}
        for png in pngs:
            record = _read_dicts([png.with_suffix(".json")])
            used = [e for e in (record[0].get("embeddings") or []) if isinstance(e, dict)] if record else []
            words[png] = [(e.get("concept"), e.get("run")) for e in used]
        shared = next((w for w in words.values() if w), [])
        for png in pngs:
            concept, run = (words.get(png) or shared or [(None, None)])[0]
            images.append(GalleryImage(png, "generate", concept, run, folder.name, _mode(png), _mtime(png)))
    return images


def _evaluations(home: Path) -> list[GalleryImage]:
    """`runs/RUN/eval/ID/images/{sd,ti}/<set>/*.png` of every concept: the run is the one measured."""
    images = []
    for png in sorted(home.glob("concepts/*/runs/*/eval/*/images/*/*/*.png")):
        eval_dir = png.parents[3]
        concept, run = eval_dir.parents[3].name, eval_dir.parents[1].name
        images.append(GalleryImage(png, "eval", concept, run, f"eval {eval_dir.name}", _mode(png), _mtime(png)))
    return images


def _experiments(home: Path) -> list[GalleryImage]:
    """`experiments/EXP/grid.png` and `images/<column>/**/*.png` of every concept: a `run-RUN`
    column is that run; the other columns (steps, synthesis prompts) are the report's run."""
    images = []
    for exp_dir in sorted(d for d in home.glob("concepts/*/experiments/*") if d.is_dir()):
        concept = exp_dir.parents[1].name
        report = next(iter(_read_dicts(exp_dir / n for n in REPORT_FILES if (exp_dir / n).is_file())), {})
        run = report.get("run") if isinstance(report.get("run"), str) else None
        grid = exp_dir / "grid.png"
        if grid.is_file():
            images.append(GalleryImage(grid, "experiment", concept, run, exp_dir.name, "grid", _mtime(grid)))
        for png in sorted((exp_dir / "images").glob("*/**/*.png")):
            column = png.relative_to(exp_dir / "images").parts[0]
            owner = column.removeprefix("run-") if column.startswith("run-") else run
            images.append(GalleryImage(png, "experiment", concept, owner, exp_dir.name, _mode(png), _mtime(png)))
    return images


def gallery(home: os.PathLike | str, concept: str | None = None, run: str | None = None,
            kind: str | None = None) -> list[GalleryImage]:
    """Every image the engine made under `home`, newest first; None filters keep everything."""
    home = Path(home)
    readers = {"generate": _outputs, "eval": _evaluations, "experiment": _experiments}
    images = [image for name, read in readers.items() if kind in (None, name) for image in read(home)]
    images = [i for i in images if (concept is None or i.concept == concept) and (run is None or i.run == run)]
    images.sort(key=lambda i: (i.mtime, str(i.path)), reverse=True)
    return images


def image_metadata(path: os.PathLike | str) -> dict:
    """What an image records about how it was made: its JSON sidecar (every image the engine
    generates has one), else the PNG's `tistudio` chunk, else A1111's `parameters` text; {} for
    an image with none (a grid)."""
    path = Path(path)
    found = _read_dicts([path.with_suffix(".json")]) if path.with_suffix(".json").is_file() else []
    if found:
        found[0].pop("dir", None)
        return found[0]
    try:
        from PIL import Image

        with Image.open(path) as image:
            chunks = dict(getattr(image, "text", {}) or {})
    except Exception:  # noqa: BLE001 - an unreadable image simply has no metadata
        return {}
    try:
        record = json.loads(chunks.get("tistudio", ""))
        if isinstance(record, dict):
            return record
    except ValueError:
        pass
    return {"parameters": chunks["parameters"]} if chunks.get("parameters") else {}
