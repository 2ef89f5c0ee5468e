"""Which embedding file a concept (and optional run and step) refers to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError
from engine.paths import read_json

FINAL_NAME = "learned_embeds.safetensors"


@dataclass
class EmbeddingRef:
    concept: str
    run_id: str
    run_dir: Path
    step: int | None  # None: the run's final embedding
    path: Path


def concept_runs(concept_dir: Path) -> list[dict]:
    """The concept's runs (oldest first), each run.json plus `run_dir`."""
    runs = []
    for path in sorted((Path(concept_dir) / "runs").glob("*/run.json")):
        try:
            record = read_json(path)
        except (OSError, ValueError):
            continue
        record["run_dir"] = str(path.parent)
        runs.append(record)
    runs.sort(key=lambda r: (r.get("created") or 0, r.get("id", "")))
    return runs


def latest_done_run(concept) -> dict | None:
    done = [r for r in concept_runs(concept.path) if r.get("status") == "done"]
    return done[-1] if done else None


def find_embedding(concept, run_id: str | None = None, step: int | None = None) -> EmbeddingRef:
    """The final embedding of the latest finished run, or of `run_id`, or its step-`step` save."""
    if run_id:
        matches = [r for r in concept_runs(concept.path) if r.get("id") == run_id]
        if not matches:
            raise UserError(f"concept {concept.name!r} has no run {run_id!r}; `tistudio concept show {concept.name}` lists its runs")
        run = matches[0]
    else:
        run = latest_done_run(concept)
        if run is None:
            raise UserError(f"concept {concept.name!r} has no finished run; train it (`tistudio train {concept.name}`) or import an embedding")
    run_dir = Path(run["run_dir"])
    if step is None:
        path = run_dir / FINAL_NAME
        if not path.is_file():
            raise UserError(f"run {run['id']} has no final embedding (status {run.get('status')}); pass --step N for a saved step")
    else:
        path = run_dir / "embeddings" / f"learned_embeds-steps-{step}.safetensors"
        if not path.is_file():
            saved = saved_steps(run_dir)
            raise UserError(f"run {run['id']} has no embedding at step {step}; saved steps: {saved or 'none'}")
    return EmbeddingRef(concept.name, run["id"], run_dir, step, path)


def saved_steps(run_dir: Path) -> list[int]:
    steps = []
    for p in (Path(run_dir) / "embeddings").glob("learned_embeds-steps-*.safetensors"):
        tail = p.name.removeprefix("learned_embeds-steps-").removesuffix(".safetensors")
        if tail.isdigit():
            steps.append(int(tail))
    return sorted(steps)
