"""What the engine wrote about a concept, read back: its runs, its Table 1s, its steps curves.

    summarize(concept)        a ConceptSummary: the concept, its runs, its best SD+TI reconstruction
    library_summaries(home)   one per concept in the library, by name
    eval_tables(concept_dir)  every Table 1 (`runs/<run>/eval/<id>/table.json`), oldest first
    steps_curves(concept_dir) every steps curve (`experiments/steps-*/curve.json`), oldest first
    latest_done_run(...)      the id of a concept's newest finished training run
    ConceptSummary.pins()     the NAME@RUN[:STEP] strings that pick one of its saved embeddings

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

from engine.embeddings import FINAL_NAME, checkpoint_steps, concept_runs

if TYPE_CHECKING:  # engine.library brings numpy and Pillow: the studio imports this module before its first draw
    from engine.library import Concept

# Where engine.metrics writes a Table 1 and engine.experiments a steps curve, under a concept.
EVAL_TABLES = "runs/*/eval/*/table.json"
STEPS_CURVES = "experiments/steps-*/curve.json"
TRAIN = "train"


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


def steps_curves(concept_dir: os.PathLike | str) -> list[dict]:
    """Every curve the steps experiment wrote for the concept, oldest first."""
    return _read_dicts(sorted(Path(concept_dir).glob(STEPS_CURVES)))


def curve_points(curve: dict) -> list[dict]:
    """A curve's points (each with a `step`), from a curve.json or an experiment job's result."""
    points = curve.get("points") or curve.get("curve") or []
    return [p for p in points if isinstance(p, dict) and "step" in p]


def ti_reconstruction(table: dict) -> float | None:
    """The SD+TI row's reconstruction score of a Table 1, if it has one."""
    for row in table.get("rows", []):
        if isinstance(row, dict) and row.get("model") == "SD+TI" \
                and isinstance(row.get("reconstruction"), (int, float)):
            return float(row["reconstruction"])
    return None


def is_train_run(run: dict) -> bool:
    """A run that trained the word (not an imported embedding); old records have no kind."""
    return run.get("kind", TRAIN) == TRAIN


def latest_done_run(concept_dir: os.PathLike | str) -> str | None:
    """The id of the concept's newest finished training run, or None."""
    runs = [r for r in concept_runs(Path(concept_dir)) if r.get("status") == "done" and is_train_run(r)]
    return runs[-1]["id"] if runs else None


@dataclass
class ConceptSummary:
    """A concept as a list shows it, read once: the concept, its images, its runs, its best score."""

    concept: Concept
    images: list[Path] = field(default_factory=list)  # its training images when it was read
    runs: list[dict] = field(default_factory=list)  # every run.json (+ run_dir), oldest first

    @property
    def name(self) -> str:
        return self.concept.name

    @property
    def train_runs(self) -> list[dict]:
        return [r for r in self.runs if is_train_run(r)]

    @property
    def done_train_runs(self) -> list[dict]:
        return [r for r in self.train_runs if r.get("status") == "done"]

    def pins(self) -> list[str]:
        """Every saved embedding as the string that picks it (generate's `uses`, train's `init_from`):
        `NAME@RUN:STEP` for each checkpoint, `NAME@RUN` for a finished run's final one."""
        pins = []
        for run in self.runs:
            run_dir = Path(run["run_dir"])
            prefix = f"{self.name}@{run_dir.name}"
            pins += [f"{prefix}:{step}" for step in checkpoint_steps(run_dir)]
            if run.get("status") == "done" and (run_dir / FINAL_NAME).is_file():
                pins.append(prefix)
        return pins

    @cached_property
    def best_reconstruction(self) -> float | None:
        """The best SD+TI reconstruction of any evaluation (read on first use: it opens every table)."""
        scores = [s for s in map(ti_reconstruction, eval_tables(self.concept.path)) if s is not None]
        return max(scores) if scores else None


def summarize(concept: Concept) -> ConceptSummary:
    return ConceptSummary(concept, concept.images, concept_runs(concept.path))


def library_summaries(home: os.PathLike | str) -> list[ConceptSummary]:
    """Every concept in the library at `home`, by name."""
    from engine.library import Library

    return [summarize(c) for c in Library(home).list()]
