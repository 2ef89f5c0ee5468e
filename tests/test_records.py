"""engine.records (a concept's runs, Table 1s and curves, read back) and engine.text.one_line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.jobs import create_run, set_status
from engine.library import Library
from engine.records import (
    curve_points,
    eval_tables,
    latest_done_run,
    library_summaries,
    steps_curves,
    summarize,
    ti_reconstruction,
)
from engine.text import one_line
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
    assert [r["id"] for r in summary.runs] == [first.name, imported.name, failed.name]
    assert [r["id"] for r in summary.train_runs] == [first.name, failed.name]
    assert [r["id"] for r in summary.done_train_runs] == [first.name]
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


def test_records_import_neither_torch_nor_textual():
    code = ("import sys, engine.records, engine.text; "
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
