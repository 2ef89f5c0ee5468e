"""The section 4 ablations end to end on the tiny model: reports, run directories, errors.

init and seeds go through the engine's own path, `handle_experiment` on a JobContext,
exactly as the worker runs an `experiment` job (with the session's tiny model warm).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from engine.errors import JobCancelled, UserError
from engine.inversion.train import TrainConfig, train
from engine.sd.formats import read_embedding
from engine.sd.generation import GenerateRequest, done_runs, generate
from engine.store import runs as jobs
from engine.store.library import Library
from engine.store.paths import atomic_write_json, home_dir
from engine.worker.context import JobContext
from engine.worker.experiments import runs_experiment, steps_experiment, synthesis_prompts
from engine.worker.job_kinds import handle_experiment, remember_model
from helpers import recomputed_scores

FAST = dict(images=2, clip="builtin:tiny", sample_steps=1)
OPTIONS = {"save_every": 1, "log_every": 1}


@pytest.fixture
def library(image_dir):
    lib = Library(home_dir())
    lib.add("cat", image_dir, "cat", description="a small grey cat")
    return lib


def experiment_job(tiny_model, library, params: dict, cancelled=None) -> JobContext:
    """An `experiment` job on concept cat as the worker would run it, the tiny model already warm."""
    params = {"model": "builtin:tiny", **params}
    spec = {"kind": "experiment", "concept": "cat", "params": params}
    run_dir = jobs.create_run(library.home, spec)
    ctx = JobContext(spec, run_dir.name, run_dir, library.home, is_cancelled=cancelled)
    remember_model(ctx.cache, tiny_model, "builtin:tiny")
    return ctx


def progress_fractions(ctx: JobContext) -> list[float]:
    return [e["fraction"] for e in ctx.log.read() if e["type"] == "progress"]


def _trained_run(model, concept, run_id="r1", steps=3):
    cfg = TrainConfig(token=concept.token, init="cat", steps=steps, save_every=1, preview_every=0, log_every=1)
    train(model, cfg, concept.runs_dir / run_id, concept.images)
    atomic_write_json(concept.runs_dir / run_id / "run.json",
                      {"id": run_id, "kind": "train", "status": "done", "created": 1.0, "steps": steps})


def test_steps_experiment_reports_every_checkpoint(tiny_model, library):
    concept = library.get("cat")
    _trained_run(tiny_model, concept)
    result = steps_experiment(tiny_model, library, "cat", prompts=["a {} in space"], **FAST)
    exp_dir = concept.path / "experiments" / result["id"]
    assert result["dir"] == str(exp_dir) and result["id"].startswith("steps-")
    curve = json.loads((exp_dir / "curve.json").read_text())
    assert curve["run"] == "r1" and curve["steps"] == [1, 2, 3]
    assert [p["step"] for p in curve["points"]] == [1, 2, 3]
    for point in curve["points"]:  # each checkpoint's numbers follow from its saved images
        recon, edit, per_image = recomputed_scores(exp_dir / "images" / f"step-{point['step']}", concept.images,
                                                   ["a {} in space"])
        assert len(point["per_prompt"]) == 1 and point["reconstruction"] == pytest.approx(recon, abs=1e-6)
        assert (point["editability"], point["editability_per_image"]) == pytest.approx((edit, per_image), abs=1e-6)
    text = (exp_dir / "curve.txt").read_text()
    assert "reconstruction" in text and "editability" in text and "\x1b[" not in text
    with Image.open(exp_dir / "grid.png") as grid:
        assert grid.width > 3 * 64 and grid.height > 2 * 64  # 2 prompt rows (neutral + 1) x 3 checkpoints
    assert len(list((exp_dir / "images").rglob("ti-*.png"))) == 3 * 2 * 2


def test_steps_experiment_at_chosen_steps_and_errors(tiny_model, library):
    concept = library.get("cat")
    _trained_run(tiny_model, concept, steps=2)
    result = steps_experiment(tiny_model, library, "cat", at=[2], prompts=["a {} in space"], **FAST)
    assert result["steps"] == [2]
    with pytest.raises(UserError, match="no embedding at step.*7.*saved: 1, 2"):
        steps_experiment(tiny_model, library, "cat", at=[7], **FAST)
    with pytest.raises(UserError, match="no run 'nope'"):
        steps_experiment(tiny_model, library, "cat", run_id="nope", **FAST)
    library.add("dog", concept.path / "images", "dog")
    with pytest.raises(UserError, match="no finished run"):
        steps_experiment(tiny_model, library, "dog", **FAST)


def test_init_experiment_trains_one_run_per_word(tiny_model, library):
    concept = library.get("cat")
    ctx = experiment_job(tiny_model, library, {"kind": "init", "values": ["cat", "dog"], "steps": 2, "seed": 3,
                                               "prompts": ["a {} in space"], **OPTIONS, **FAST})
    result = handle_experiment(ctx)
    assert result["id"].startswith("init-") and [r["label"] for r in result["runs"]] == ["init cat", "init dog"]
    assert [r["init"] for r in result["runs"]] == ["cat", "dog"] and {r["seed"] for r in result["runs"]} == {3}
    exp_dir = concept.path / "experiments" / result["id"]
    for name in ("grid.png", "table.json", "table.md"):
        assert (exp_dir / name).is_file()
    table = json.loads((exp_dir / "table.json").read_text())
    assert table["kind"] == "init" and table["train"]["steps"] == 2 and len(table["runs"]) == 2
    vectors = []
    for r in result["runs"]:
        run_dir = concept.runs_dir / r["run"]
        record = json.loads((run_dir / "run.json").read_text())
        assert (record["status"], record["kind"], record["experiment"]) == ("done", "train", result["id"])
        assert record["parent"] == ctx.run_id and record["label"] == r["label"]
        assert record["params"]["init"] == r["init"] and record["params"]["steps"] == 2
        assert (run_dir / "embeddings" / "learned_embeds-steps-1.safetensors").is_file()
        vectors.append(read_embedding(run_dir / "learned_embeds.safetensors").vectors)
    assert not vectors[0].equal(vectors[1])
    markdown = (exp_dir / "table.md").read_text()
    assert "init dog" in markdown and "effect of the initializer word" in markdown and "- Training: 2 steps" in markdown
    assert not markdown.endswith("\n\n")  # one ending, written once
    job = jobs.load_run(ctx.run_dir)
    assert job["members"] == [r["run"] for r in result["runs"]] and job["experiment"] == result["id"]
    seen = progress_fractions(ctx)
    assert seen == sorted(seen) and seen[-1] == 1.0
    # The runs are ordinary finished runs: generation finds them.
    assert {r.id for r in done_runs(concept)} == {r["run"] for r in result["runs"]}
    assert generate(tiny_model, library, GenerateRequest("a photo of <cat>", steps=1))


def test_seeds_experiment_one_run_per_seed(tiny_model, library):
    concept = library.get("cat")
    ctx = experiment_job(tiny_model, library, {"kind": "seeds", "values": [0, 1], "steps": 1,
                                               "prompts": ["a {} in space"], **FAST})
    result = handle_experiment(ctx)
    assert [r["seed"] for r in result["runs"]] == [0, 1] and {r["init"] for r in result["runs"]} == {"cat"}
    assert result["id"].startswith("seeds-") and result["kind"] == "seeds"
    assert (concept.path / "experiments" / result["id"] / "grid.png").is_file()
    # The same runs, compared again as plain finished runs.
    ids = [r["run"] for r in result["runs"]]
    again = runs_experiment(tiny_model, library, "cat", ids, ["A", "B"], prompts=["a {} in space"], **FAST)
    assert again["id"].startswith("runs-") and [r["label"] for r in again["runs"]] == ["A", "B"]
    assert [r["seed"] for r in again["runs"]] == [0, 1]
    assert [r["reconstruction"] for r in again["runs"]] == [r["reconstruction"] for r in result["runs"]]
    assert "| A |" in (concept.path / "experiments" / again["id"] / "table.md").read_text()
    with pytest.raises(UserError, match="one label per run"):
        runs_experiment(tiny_model, library, "cat", ids, ["A"], **FAST)
    with pytest.raises(UserError, match="no run 'nope'"):
        runs_experiment(tiny_model, library, "cat", ["nope"], **FAST)


def test_a_resumed_experiment_job_keeps_its_members_and_report_folder(tiny_model, library):
    concept = library.get("cat")
    params = {"kind": "seeds", "values": [0, 1], "steps": 2, "prompts": ["a {} in space"], **FAST}
    ctx = experiment_job(tiny_model, library, params, cancelled=lambda: True)
    with pytest.raises(JobCancelled):
        handle_experiment(ctx)
    first = jobs.load_run(ctx.run_dir)
    resumed = JobContext(ctx.spec, ctx.run_id, ctx.run_dir, ctx.home, resumed=True)
    remember_model(resumed.cache, tiny_model, "builtin:tiny")
    result = handle_experiment(resumed)
    assert result["id"] == first["experiment"] and [r["run"] for r in result["runs"]] == first["members"]
    assert len(list(concept.runs_dir.glob("*/run.json"))) == 3  # the job and its two members, no more


def test_bad_experiment_settings_are_refused_before_any_run_exists(tiny_model, library):
    concept = library.get("cat")
    for params, match in (
        ({"kind": "init", "values": ["cat", "xqzvbn"], "steps": 1}, "initializer"),
        ({"kind": "init", "values": [], "steps": 1}, "at least one initializer word"),
        ({"kind": "seeds", "values": [], "steps": 1}, "at least one seed"),
        ({"kind": "seeds", "values": [0], "steps": 0}, "steps"),
        ({"kind": "volume", "values": [0]}, "unknown experiment"),
    ):
        ctx = experiment_job(tiny_model, library, {**params, **FAST})
        with pytest.raises(UserError, match=match):
            handle_experiment(ctx)
        ctx.run_dir.joinpath("run.json").unlink()  # the job's own record; its members must not exist
    assert not list(concept.runs_dir.glob("*/run.json"))


def test_cancel_marks_the_runs_cancelled(tiny_model, library):
    concept = library.get("cat")
    ctx = experiment_job(tiny_model, library, {"kind": "seeds", "values": [0, 1], "steps": 3, **FAST},
                         cancelled=lambda: True)
    with pytest.raises(JobCancelled):
        handle_experiment(ctx)
    members = jobs.load_run(ctx.run_dir)["members"]
    records = [jobs.load_run(concept.runs_dir / m) for m in members]
    assert len(records) == 2 and {r["status"] for r in records} == {"cancelled"}


def test_synthesis_batches_show_the_word_in_new_scenes(tiny_model, library):
    concept = library.get("cat")
    _trained_run(tiny_model, concept)
    assert all("{}" in p for p in synthesis_prompts("object") + synthesis_prompts("style"))
    ctx = experiment_job(tiny_model, library, {"kind": "synthesis", "images": 1, "sample_steps": 1,
                                               "prompts": ["a {} on the moon", "a {} in a teacup"]})
    result = handle_experiment(ctx)
    assert result["prompts"] == ["a <cat> on the moon", "a <cat> in a teacup"] and result["run"] == "r1"
    exp_dir = concept.path / "experiments" / result["id"]
    assert {p.name for p in exp_dir.iterdir()} >= {"grid.png", "synthesis.json", "synthesis.md", "images"}
    for row in result["rows"]:
        assert [(i["mode"], i["seed"]) for i in row["images"]] == [("sd", 0), ("ti", 0)]
        for image in row["images"]:
            png = Image.open(image["path"])
            assert "parameters" in png.text and Path(image["json"]).is_file()
        assert "<cat>" not in row["images"][0]["prompt"]  # SD gets the description
    assert Image.open(result["grid"]).size[0] > 2 * 64


def test_regularize_experiment_is_table_1_per_method(tiny_model, library):
    concept = library.get("cat")
    ctx = experiment_job(tiny_model, library, {"kind": "regularize", "values": ["none", "directional"], "steps": 2,
                                               "lr": 5e-2, "prompts": ["a {} in space"], **OPTIONS, **FAST})
    result = handle_experiment(ctx)
    assert [r["label"] for r in result["rows"]] == ["SD", "regularize none", "regularize directional"]
    assert [r["regularize"] for r in result["runs"]] == ["none", "directional"]
    markdown = (concept.path / "experiments" / result["id"] / "table.md").read_text()
    assert "effect of the regulariser" in markdown and "| SD |" in markdown
    plain, directional = (read_embedding(concept.runs_dir / r["run"] / "learned_embeds.safetensors").vectors
                          for r in result["runs"])
    start = tiny_model.text_encoder.get_input_embeddings().weight[
        tiny_model.tokenizer("cat", add_special_tokens=False).input_ids[0]].float()
    assert abs(float(directional.norm()) - float(start.norm())) < 1e-4
    assert not plain.equal(directional)
    bad = experiment_job(tiny_model, library, {"kind": "regularize", "values": ["sideways"], **FAST})
    with pytest.raises(UserError, match="unknown regulariser 'sideways'"):
        handle_experiment(bad)
