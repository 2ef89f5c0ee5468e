"""engine.store.records (a concept's runs, Table 1s and curves, read back) and engine.errors.one_line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import one_line
from engine.store.library import Library
from engine.store.records import (
    compare_tables,
    curve_points,
    eval_label,
    eval_tables,
    experiment_reports,
    latest_done_run,
    library_summaries,
    parse_pin,
    report_of_result,
    steps_curves,
    summarize,
    ti_reconstruction,
    written_prompt,
)
from engine.store.runs import create_run, set_status
from helpers import make_images

ROOT = Path(__file__).resolve().parent.parent


def _table(run_dir: Path, eval_id: str, ti: float | None) -> Path:
    rows = [{"model": "SD", "reconstruction": 0.5, "editability": 0.3}]
    if ti is not None:
        rows.append({"model": "SD+TI", "reconstruction": ti, "editability": 0.2})
    path = run_dir / "eval" / eval_id / "table.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"id": eval_id, "rows": rows}))
    return path


def _run(home: Path, concept: str, status: str, kind: str = "train") -> Path:
    run_dir = create_run(home, {"kind": kind, "concept": concept, "params": {}})
    set_status(run_dir, status)
    time.sleep(0.01)  # distinct creation times: runs sort by them
    return run_dir


@pytest.fixture
def library(tmp_path):
    home = tmp_path / "home"
    lib = Library(home)
    lib.add("cat", make_images(tmp_path / "imgs"), "cat")
    return lib


def test_a_summary_holds_the_concept_its_runs_and_its_best_evaluation(library):
    home, concept = library.home, library.get("cat")
    first = _run(home, "cat", "done")
    imported = _run(home, "cat", "done", kind="import")
    failed = _run(home, "cat", "failed")
    _table(first, "20260101-000001", 0.7)
    _table(first, "20260101-000002", 0.8)
    _table(failed, "20260101-000003", None)  # no SD+TI row: no score

    summary = summarize(concept)
    assert summary.name == "cat" and summary.concept == concept
    assert summary.images == concept.images and len(summary.images) == 3
    assert [r.id for r in summary.runs] == [first.name, imported.name, failed.name]
    assert [r.id for r in summary.train_runs] == [first.name, failed.name]
    assert [r.id for r in summary.done_train_runs] == [first.name]
    assert summary.best_reconstruction == pytest.approx(0.8)
    assert [s.name for s in library_summaries(home)] == ["cat"]
    assert latest_done_run(concept.path) == first.name  # the import is not a training run

    # the saved embeddings, as the strings that pick them (NAME@RUN final, NAME@RUN:STEP checkpoints)
    assert summary.pins() == []  # run.json says done, but no file is there yet
    (first / "learned_embeds.safetensors").write_bytes(b"")
    (failed / "embeddings").mkdir()
    for step in (16, 8):
        (failed / "embeddings" / f"learned_embeds-steps-{step}.safetensors").write_bytes(b"")
    assert summarize(concept).pins() == [f"cat@{first.name}", f"cat@{failed.name}:8", f"cat@{failed.name}:16"]


def test_a_summary_knows_its_words_vectors_family_and_latest_inspection(library):
    from engine.store.runs import update_run

    home, concept = library.home, library.get("cat")
    assert summarize(concept).vectors is None and summarize(concept).family is None
    trained = _run(home, "cat", "done")
    update_run(trained, params={"vectors": 2}, model={"spec": "builtin:tiny", "family": "sd1"})
    assert (summarize(concept).vectors, summarize(concept).family) == (2, "sd1")
    imported = create_run(home, {"kind": "import", "concept": "cat", "params": {"vectors": 3, "family": "sdxl"}})
    set_status(imported, "done")
    failed = _run(home, "cat", "failed")  # newer, but a finished word wins
    update_run(failed, params={"vectors": 5})
    evaluation = _run(home, "cat", "done", kind="eval")  # measures a word, holds none
    summary = summarize(concept)
    assert [r.id for r in summary.word_runs] == [trained.name, imported.name, failed.name]
    assert evaluation.name not in [r.id for r in summary.word_runs]
    assert (summary.vectors, summary.family) == (3, "sdxl")
    assert summary.latest_inspection() is None
    for n in (1, 2):
        inspection = _run(home, "cat", "done", kind="inspect")
        update_run(inspection, result={"run": trained.name, "n": n})
    _run(home, "cat", "failed", kind="inspect")
    assert summarize(concept).latest_inspection().result["n"] == 2


def test_tables_and_curves_are_read_in_order_and_damaged_ones_skipped(library):
    concept = library.get("cat")
    assert eval_tables(concept.path) == [] and steps_curves(concept.path) == []
    assert summarize(concept).best_reconstruction is None and latest_done_run(concept.path) is None
    run = _run(library.home, "cat", "done")
    newer = _table(run, "20260102-000000", 0.9)
    older = _table(run, "20260101-000000", 0.6)
    broken = run / "eval" / "20260103-000000" / "table.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{ half a table")
    tables = eval_tables(concept.path)
    assert [t["dir"] for t in tables] == [str(older.parent), str(newer.parent)]
    assert [ti_reconstruction(t) for t in tables] == [0.6, 0.9]

    curve = concept.path / "experiments" / "steps-20260101-000000" / "curve.json"
    curve.parent.mkdir(parents=True)
    curve.write_text(json.dumps({"points": [{"step": 8, "reconstruction": 0.5}, {"bad": 1}, "x"]}))
    curves = steps_curves(concept.path)
    assert len(curves) == 1 and curves[0]["dir"] == str(curve.parent)
    assert curve_points(curves[0]) == [{"step": 8, "reconstruction": 0.5}]
    assert curve_points({"curve": [{"step": 2}]}) == [{"step": 2}]  # an experiment job's result


def _scores(rec: float, edit: float) -> dict:
    return {"reconstruction": rec, "editability": edit, "editability_per_image": edit - 0.01}


def test_two_evaluations_compare_score_by_score_and_prompt_by_prompt():
    def table(eval_id, run, ti_rec, ti_edit, final=True, written=True):
        prompts = ["a photo of a {} on a blue background", "a {} in the jungle"]
        return {"id": eval_id, "run": run, "step": 8, "final": final, "token": "<cat>",
                "rows": [{"model": "SD", **_scores(0.5, 0.3)}, {"model": "SD+TI", **_scores(ti_rec, ti_edit)}],
                "per_prompt": [{"prompt": p, **({"written": p.replace("{}", "<cat>")} if written else {}),
                                "clip_text": p.replace("{}", ""), "SD+TI": {"editability": ti_edit + i / 10}}
                               for i, p in enumerate(prompts)]}

    a = table("20260101-020000", "run-a", 0.7, 0.25, written=False)  # from before "written"
    b = table("20260102-030000", "run-b", 0.75, 0.2, final=False)
    assert eval_label(a) == "run-a final · eval 01-01 02:00"
    assert eval_label(b) == "run-b step 8 · eval 01-02 03:00"
    rows = compare_tables(a, b)
    by_name = {name: (x, y, d) for name, x, y, d in rows}
    assert [name for name, *_ in rows[:6]] == ["SD+TI reconstruction", "SD+TI editability", "SD+TI edit./image",
                                                "SD reconstruction", "SD editability", "SD edit./image"]
    assert by_name["SD+TI reconstruction"] == pytest.approx((0.7, 0.75, 0.05))
    assert by_name["SD editability"] == pytest.approx((0.3, 0.3, 0.0))
    assert by_name["a photo of a <cat> on a blue background"] == pytest.approx((0.25, 0.2, -0.05))
    assert by_name["a <cat> in the jungle"] == pytest.approx((0.35, 0.3, -0.05))
    # a table missing a row compares what both have
    b["rows"] = b["rows"][:1]
    assert dict((n, (x, y, d)) for n, x, y, d in compare_tables(a, b))["SD+TI reconstruction"] == (0.7, None, None)

    assert written_prompt({"prompt": "a {} on a table", "written": "a <dog> on a table"}, "<cat>") == \
        "a <dog> on a table"
    assert written_prompt({"prompt": "a {} on a table"}, "<cat>") == "a <cat> on a table"
    assert written_prompt({"clip_text": "a on a table"}, "<cat>") == "a on a table"


def test_experiment_reports_of_every_kind_are_read_oldest_first(library):
    concept = library.get("cat")
    assert experiment_reports(concept.path) == []
    root = concept.path / "experiments"

    def write(folder, name, data, grid=True):
        (root / folder).mkdir(parents=True)
        (root / folder / name).write_text(json.dumps(data))
        if grid:
            (root / folder / "grid.png").write_bytes(b"png")

    write("steps-20260101-030000", "curve.json", {"id": "steps-20260101-030000", "kind": "steps",
                                                   "points": [{"step": 8, **_scores(0.6, 0.3)}]})
    write("seeds-20260101-010000", "table.json", {"id": "seeds-20260101-010000", "kind": "seeds",  # an old report
                                                   "runs": [{"run": "r1", "label": "seed 0", **_scores(0.7, 0.2)},
                                                            {"run": "r2", "label": "seed 1", **_scores(0.6, 0.3)}]})
    write("regularize-20260101-040000", "table.json", {
        "id": "regularize-20260101-040000", "kind": "regularize",
        "rows": [{"label": "SD", "model": "SD", **_scores(0.5, 0.5)},
                 {"label": "regularize none", "model": "SD+TI", "run": "r3", **_scores(0.8, 0.3)}],
        "runs": [{"run": "r3", "label": "regularize none", **_scores(0.8, 0.3)}]})
    write("synthesis-20260101-050000", "synthesis.json", {
        "id": "synthesis-20260101-050000", "kind": "synthesis", "prompts": ["a <cat> in Paris"],
        "rows": [{"prompt": "a <cat> in Paris", "template": "a {} in Paris", "images": [{"path": "x.png"}]}]},
        grid=False)
    (root / "init-20260101-060000").mkdir()  # still running: nothing written yet
    reports = experiment_reports(concept.path)
    assert [r.kind for r in reports] == ["seeds", "steps", "regularize", "synthesis"]
    seeds, steps, reg, synth = reports
    assert [r["label"] for r in seeds.rows] == ["seed 0", "seed 1"] and seeds.grid == seeds.dir / "grid.png"
    assert seeds.label() == "seeds · 01-01 01:00 · 2 runs"
    assert steps.rows[0]["label"] == "step 8" and steps.label() == "steps · 01-01 03:00 · 1 checkpoint"
    assert [r["label"] for r in reg.rows] == ["SD", "regularize none"] and reg.label().endswith("1 run")
    assert synth.rows[0]["label"] == "a <cat> in Paris" and synth.grid is None
    assert synth.label() == "synthesis · 01-01 05:00 · 1 prompt"
    # a job's result is a report too (the folder it names)
    result = {"id": "init-20260101-060000", "kind": "init", "dir": str(root / "init-20260101-060000"),
              "grid": str(seeds.dir / "grid.png"), "rows": [{"label": "init cat", "run": "r9", **_scores(0.1, 0.2)}]}
    report = report_of_result(result)
    assert report.kind == "init" and report.grid == seeds.dir / "grid.png" and report.rows[0]["run"] == "r9"
    assert report_of_result({"table": {}}) is None and report_of_result(None) is None
    assert parse_pin("cat@r1:8") == ("cat", "r1", 8) and parse_pin("cat@r1") == ("cat", "r1", None)
    assert parse_pin("cat") == ("cat", None, None)


def test_records_import_neither_torch_nor_textual():
    code = ("import sys, engine.store.records, engine.errors; "
            "bad = {'torch', 'textual'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_one_line_is_one_short_line():
    assert one_line("a\n  b\tc") == "a b c"
    assert one_line(ValueError()) == "ValueError"  # an exception with no message: its class
    assert one_line(ValueError("bad\nvalue")) == "bad value"
    assert one_line("") == ""
    cut = one_line("x" * 50, limit=10)
    assert cut == "x" * 9 + "…" and len(cut) == 10
    assert one_line("x" * 10, limit=10) == "x" * 10


def _png(path: Path, record: dict | None = None, chunk: dict | None = None) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in (chunk or {}).items():
        info.add_text(key, value)
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    if record is not None:
        path.with_suffix(".json").write_text(json.dumps(record))
    return path


def test_the_gallery_finds_every_image_with_its_concept_run_and_metadata(library):
    from engine.store.records import gallery, image_metadata

    home, concept = library.home, library.get("cat")
    word = {"concept": "cat", "run": "r1", "step": 8, "final": False, "token": "<cat>"}
    out = home / "outputs" / "20260101-000000-a-photo-of-cat"
    sd = _png(out / "sd-0000.png", {"prompt": "a photo of a cat", "mode": "sd", "embeddings": []})
    ti = _png(out / "ti-0000.png", {"prompt": "a photo of <cat>", "mode": "ti", "seed": 0, "embeddings": [word]})
    plain = _png(home / "outputs" / "20260101-010000-a-dog" / "sd-0000.png", {"prompt": "a dog", "embeddings": []})
    evaluated = _png(concept.runs_dir / "r1" / "eval" / "20260101-020000" / "images" / "ti" / "edit-1" / "ti-0001.png",
                     {"prompt": "a <cat> in the jungle", "embeddings": [word]})
    exp = concept.path / "experiments" / "seeds-20260101-030000"
    (exp / "table.json").parent.mkdir(parents=True)
    (exp / "table.json").write_text(json.dumps({"id": exp.name, "kind": "seeds", "runs": []}))
    grid = _png(exp / "grid.png")
    member = _png(exp / "images" / "run-r2" / "reconstruction" / "ti-0000.png", {"prompt": "a photo of <cat>"})
    synth = concept.path / "experiments" / "synthesis-20260101-040000"
    (synth / "synthesis.json").parent.mkdir(parents=True)
    (synth / "synthesis.json").write_text(json.dumps({"id": synth.name, "run": "r1"}))
    scene = _png(synth / "images" / "prompt-0" / "ti-0000.png", {"prompt": "a <cat> in Paris"})
    for age, path in enumerate([scene, member, grid, evaluated, plain, ti, sd]):  # newest first, as listed
        os.utime(path, (1_000_000 - age, 1_000_000 - age))

    everything = gallery(home)
    assert [i.path for i in everything] == [scene, member, grid, evaluated, plain, ti, sd]
    by_path = {i.path: i for i in everything}
    assert (by_path[ti].kind, by_path[ti].concept, by_path[ti].run, by_path[ti].mode) == ("generate", "cat", "r1", "ti")
    assert (by_path[sd].concept, by_path[sd].run) == ("cat", "r1")  # the SD side of a comparison follows its folder
    assert (by_path[plain].concept, by_path[plain].run) == (None, None)
    assert (by_path[evaluated].kind, by_path[evaluated].run, by_path[evaluated].source) == (
        "eval", "r1", "eval 20260101-020000")
    assert (by_path[grid].mode, by_path[grid].run, by_path[member].run) == ("grid", None, "r2")
    assert by_path[scene].run == "r1" and by_path[scene].source == synth.name
    assert [i.path for i in gallery(home, concept="cat", run="r1")] == [scene, evaluated, ti, sd]
    assert [i.path for i in gallery(home, kind="experiment")] == [scene, member, grid]
    assert gallery(home, concept="dog") == []

    assert image_metadata(ti)["embeddings"] == [word]
    chunked = _png(home / "loose" / "a.png", chunk={"tistudio": json.dumps({"prompt": "from the chunk"})})
    assert image_metadata(chunked) == {"prompt": "from the chunk"}
    a1111 = _png(home / "loose" / "b.png", chunk={"parameters": "a cat\nSteps: 20"})
    assert image_metadata(a1111) == {"parameters": "a cat\nSteps: 20"}
    assert image_metadata(grid) == {} and image_metadata(home / "missing.png") == {}
