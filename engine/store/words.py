"""A concept's runs and the embedding files they saved (no torch: the studio reads these too).

`choose_embedding` picks one (a run's final embedding or a saved step) and says what
to type when the pick is impossible; reading its vectors is `engine.sd.generation.load_used`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError
from engine.store.runs import Run

FINAL_NAME = "learned_embeds.safetensors"
_STEP_FILE = re.compile(r"learned_embeds-steps-(\d+)\.safetensors")
SAFE_RUN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
BEST = "best"  # NAME@RUN:best, --step best: the run's best probed step (its record's `best`)


def parse_step(text: str, option: str = "--step") -> int | str:
    """A saved step as typed: a whole number, or `best`."""
    text = str(text).strip()
    if text.isdigit():
        return int(text)
    if text.lower() == BEST:
        return BEST
    raise UserError(f"{option} {text!r}: give a saved step's number, e.g. 500, or best")


def read_record(run_dir: Path) -> dict | None:
    """A run's run.json, or None when it is missing or damaged."""
    try:
        return Run.load(run_dir).record
    except (OSError, ValueError):
        return None


def done_runs(concept) -> list[Run]:
    """A concept's finished runs that have a final embedding, oldest first."""
    return [run for run in Run.of_concept(concept.path) if run.done and (run.dir / FINAL_NAME).is_file()]


def run_vectors(record: dict) -> int:
    """How many vectors (per text encoder) a run's word has: its params say (1, the default, if not)."""
    for source in (record.get("params") or {}, record.get("config") or {}):
        value = source.get("vectors") if isinstance(source, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return 1


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps with a saved `embeddings/learned_embeds-steps-N.safetensors`, ascending."""
    found = []
    for path in (Path(run_dir) / "embeddings").glob("learned_embeds-steps-*.safetensors"):
        match = _STEP_FILE.fullmatch(path.name)
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def step_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "embeddings" / f"learned_embeds-steps-{step}.safetensors"


def final_step(record: dict) -> int | None:
    """The step count a finished run trained for, from its record."""
    for source in (record, record.get("params") or {}, record.get("spec") or {}):
        value = source.get("steps") if isinstance(source, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


@dataclass
class EmbeddingChoice:
    """Which saved embedding of a concept to use."""

    run: str
    run_dir: Path
    record: dict
    path: Path
    step: int | None
    final: bool


def choose_embedding(concept, run: str | None = None, step: int | str | None = None,
                     option: str = "use") -> EmbeddingChoice:
    """Run `run` (default: the latest finished) at `step` (default: its final embedding; `best`:
    its best probed step, as its record names it).

    `option` is how the asking command names a pick in its messages: "use" for
    `--use NAME@RUN:STEP` (generate), "run-step" for `--run RUN --step N` (eval, export),
    "run" for `--run RUN` alone (the steps experiment)."""

    def pick(run_id: str = "RUN", at: str = "STEP") -> str:
        return {"use": f"--use {concept.name}@{run_id}:{at}", "run": f"--run {run_id}"}.get(
            option, f"--run {run_id} --step {at}")

    if run is None:
        runs = done_runs(concept)
        if not runs:
            raise UserError(f"concept {concept.name!r} ({concept.token}) has no finished training run; train it "
                            f"first (`tistudio train {concept.name}`) or pick a run with {pick()}")
        run, run_dir, record = runs[-1].id, runs[-1].dir, runs[-1].record
    else:
        run_dir = concept.runs_dir / run
        record = read_record(run_dir) if SAFE_RUN.match(run) else None
        if record is None:
            raise UserError(f"concept {concept.name!r} has no run {run!r}; `tistudio runs` lists them")
    if step is None:
        path = run_dir / FINAL_NAME
        if record.get("status") != "done" or not path.is_file():
            steps = ", ".join(map(str, checkpoint_steps(run_dir))) or "none yet"
            raise UserError(f"run {run} of {concept.name!r} has not finished (status {record.get('status')}); "
                            f"pick a saved step with {pick(run)} (steps: {steps})")
        return EmbeddingChoice(run, run_dir, record, path, final_step(record), True)
    if step == BEST:
        step = best_step(record, run, concept.name, pick(run))
    path = step_file(run_dir, step)
    if not path.is_file():
        steps = ", ".join(map(str, checkpoint_steps(run_dir))) or "none"
        raise UserError(f"run {run} of {concept.name!r} has no embedding at step {step}; steps saved: {steps}")
    return EmbeddingChoice(run, run_dir, record, path, step, False)


def best_step(record: dict, run: str, concept: str, pick: str = "NAME@RUN:STEP") -> int:
    """The step a run's record names as its best (engine.inversion.stopping.choose_best), or a
    one-line error saying why it has none and what to pick instead."""
    best = record.get("best")
    if isinstance(best, dict) and isinstance(best.get("step"), int):
        return best["step"]
    raise UserError(f"run {run} of {concept!r} has no best step: it has no probes (trained with --probe-every 0, "
                    f"or before its first probe); pick a saved step with {pick}")
