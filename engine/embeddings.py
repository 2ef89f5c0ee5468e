"""A concept's runs and the embedding files they saved (no torch: the studio reads these too).

Reading the vectors themselves, and choosing one by NAME@RUN:STEP, is
`engine.generate.load_used`.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from engine.paths import read_json

FINAL_NAME = "learned_embeds.safetensors"
_STEP_FILE = re.compile(r"learned_embeds-steps-(\d+)\.safetensors")


def read_record(run_dir: Path) -> dict | None:
    """A run's run.json, or None when it is missing or damaged."""
    try:
        record = read_json(Path(run_dir) / "run.json")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def created_time(record: dict) -> float:
    value = record.get("created")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return dt.datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return 0.0


def concept_runs(concept_dir: Path) -> list[dict]:
    """Every run of a concept (oldest first): its run.json plus `run_dir`."""
    runs = []
    for path in (Path(concept_dir) / "runs").glob("*/run.json"):
        record = read_record(path.parent)
        if record is not None:
            record["run_dir"] = str(path.parent)
            runs.append(record)
    runs.sort(key=lambda r: (created_time(r), r.get("id", "")))
    return runs


def done_runs(concept) -> list[tuple[str, Path, dict]]:
    """A concept's finished runs that have a final embedding, as (id, dir, run.json), oldest first."""
    return [
        (Path(r["run_dir"]).name, Path(r["run_dir"]), r)
        for r in concept_runs(concept.path)
        if r.get("status") == "done" and (Path(r["run_dir"]) / FINAL_NAME).is_file()
    ]


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
