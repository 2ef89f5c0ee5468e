"""Table 1 and the ablations on an SDXL model (builtin:sdxl-tiny): unchanged in meaning, with the family on record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.inversion.judge import default_clip
from engine.inversion.metrics import evaluate
from engine.inversion.train import TrainConfig, train
from engine.store import runs as jobs
from engine.store.library import Library
from engine.store.paths import atomic_write_json, home_dir
from engine.worker.context import JobContext
from engine.worker.experiments import steps_experiment
from engine.worker.job_kinds import handle_experiment, remember_model
from helpers import recomputed_scores

FAST = {"images": 1, "clip": "builtin:tiny", "sample_steps": 1}


def _library(image_dir):
    lib = Library(home_dir())
    lib.add("cat", image_dir, "cat", description="a small grey cat")
    return lib


def test_table_1_on_sdxl(sdxl_model, image_dir):
    lib = _library(image_dir)
    concept = lib.get("cat")
    cfg = TrainConfig(token=concept.token, init="cat", steps=2, save_every=1, preview_every=0, log_every=1,
                      vectors=2)
    train(sdxl_model, cfg, concept.runs_dir / "r1", concept.images)
    atomic_write_json(concept.runs_dir / "r1" / "run.json",
                      {"id": "r1", "kind": "train", "status": "done", "created": 1.0, "steps": 2})
    table = evaluate(sdxl_model, lib, "cat", **FAST)
    assert [r["model"] for r in table["rows"]] == ["SD", "SD+TI"]
    assert table["model"]["family"] == "sdxl" and table["model"]["text_widths"] == [32, 64]
    assert table["rendered"]["SD+TI"][0] == "a photo of <cat>"
    assert table["rendered"]["SD"][0] == "a photo of a small grey cat"
    eval_dir = Path(table["dir"])
    for row, folder in zip(table["rows"], ("sd", "ti")):  # the numbers follow from the saved images
        recon, edit, per_image = recomputed_scores(eval_dir / "images" / folder, concept.images, table["prompts"])
        assert row["reconstruction"] == pytest.approx(recon, abs=1e-6)
        assert row["editability"] == pytest.approx(edit, abs=1e-6)
        assert row["editability_per_image"] == pytest.approx(per_image, abs=1e-6)
    steps = steps_experiment(sdxl_model, lib, "cat", run_id="r1", prompts=["a {} in space"], **FAST)
    assert [p["step"] for p in steps["points"]] == [1, 2]
    assert default_clip("builtin:sdxl-tiny") == "builtin:tiny"


def test_seed_ablation_on_sdxl_trains_runs_together(sdxl_model, image_dir):
    lib = _library(image_dir)
    params = {"kind": "seeds", "values": [0, 1], "steps": 2, "prompts": ["a {} in space"], "save_every": 1,
              "log_every": 1, "vectors": 2, "model": "builtin:sdxl-tiny", **FAST}
    spec = {"kind": "experiment", "concept": "cat", "params": params}
    run_dir = jobs.create_run(lib.home, spec)
    ctx = JobContext(spec, run_dir.name, run_dir, lib.home)
    remember_model(ctx.cache, sdxl_model, "builtin:sdxl-tiny")
    result = handle_experiment(ctx)
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    table = json.loads((Path(result["dir"]) / "table.json").read_text())
    assert table["model"]["family"] == "sdxl"
