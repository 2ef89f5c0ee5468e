"""Faults injected into real runs: kill -9 anywhere, a full disk, GPU out of memory, NaN loss.

Each test drives the real engine on builtin:tiny and checks the three promises:
nothing partial is ever visible under a final name, the user gets a clear message,
and nothing is lost (resume ends where an uninterrupted run ends; the engine serves on).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.sd.formats import read_embedding
from engine.store.library import Library
from engine.wire.client import call
from tistudio.cli import main

pytestmark = pytest.mark.timeout(600)

PARAMS = {"steps": 15, "save_every": 5, "preview_every": 0, "log_every": 5, "seed": 5}


@pytest.fixture
def concept(engine_home, image_dir):
    from engine.sd.models import load_tokenizer

    Library(engine_home).add("toy", image_dir, "cat", tokenizer=load_tokenizer())
    return "toy"


@pytest.fixture
def faults(monkeypatch, tmp_path):
    def arm(spec: str):
        monkeypatch.setenv("TISTUDIO_FAULTS", spec)
        monkeypatch.setenv("TISTUDIO_FAULTS_STATE", str(tmp_path / "faults"))

    return arm


def _run(home, run_id):
    return next(j for j in call("jobs", home=home) if j["id"] == run_id)


def assert_nothing_partial(home: Path) -> None:
    """Every file under a final name is whole: safetensors load, JSON parses, no stray temp files
    outside hidden names (which readers skip)."""
    for path in home.rglob("*"):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(home).parts):
            continue
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path))
        elif path.suffix in (".json",) or path.name == "concept.toml":
            if path.suffix == ".json":
                json.loads(path.read_text())
        elif path.name == "events.jsonl":
            lines = path.read_text().splitlines()
            for line in lines[:-1]:  # a reader ignores a trailing partial line; none before it
                json.loads(line)


def test_kill_9_in_every_kind_of_write_then_resume_loses_nothing(engine_home, concept, faults, tiny_model, tmp_path):
    from engine.inversion.train import train
    from engine.worker.sweeps import train_config_from

    c = Library(engine_home).get(concept)
    expected = read_embedding(train(tiny_model, train_config_from(dict(PARAMS), c), tmp_path / "ref",
                                    c.images)).vectors
    faults("write.learned_embeds-steps-5.safetensors@0,checkpoint.mid_write@10,write.run.json@0,step@13")
    run_id = call("submit", "train", concept=concept, params=PARAMS, home=engine_home)
    kills = 0
    while call("wait", run_id, home=engine_home) == "interrupted":
        kills += 1
        assert kills <= 5
        assert_nothing_partial(engine_home)
        call("submit", resume=run_id, home=engine_home)
    assert kills == 4
    run = _run(engine_home, run_id)
    assert run["status"] == "done"
    assert torch.equal(read_embedding(run["embedding"]).vectors, expected)
    assert_nothing_partial(engine_home)


def test_disk_full_during_a_checkpoint_fails_clearly_keeps_the_last_and_the_engine_serves(
        engine_home, concept, faults):
    faults("checkpoint.mid_write@10:enospc")
    run_id = call("submit", "train", concept=concept, params=PARAMS, home=engine_home)
    assert call("wait", run_id, home=engine_home) == "failed"
    run = _run(engine_home, run_id)
    assert "disk is full" in run["error"] and "\n" not in run["error"]
    ckpts = sorted(p.name for p in (Path(run["run_dir"]) / "checkpoints").iterdir())
    assert ckpts == ["step-5"]  # the earlier checkpoint intact, no partial one
    call("submit", resume=run_id, home=engine_home)  # space freed: the same engine carries on
    assert call("wait", run_id, home=engine_home) == "done"


def test_gpu_out_of_memory_suggests_low_vram_and_the_next_job_runs(engine_home, concept, faults):
    faults("step@3:oom")
    run_id = call("submit", "train", concept=concept, params=PARAMS, home=engine_home)
    assert call("wait", run_id, home=engine_home) == "failed"
    assert "--low-vram" in _run(engine_home, run_id)["error"]
    second = call("submit", "train", concept=concept, params={**PARAMS, "steps": 5}, home=engine_home)
    assert call("wait", second, home=engine_home) == "done"


def test_nan_loss_stops_the_run_and_the_last_good_embedding_exports(engine_home, concept, faults, tmp_path,
                                                                      capsys):
    faults("loss@7:nan")
    run_id = call("submit", "train", concept=concept, params=PARAMS, home=engine_home)
    assert call("wait", run_id, home=engine_home) == "failed"
    run = _run(engine_home, run_id)
    assert "NaN" in run["error"]
    out = tmp_path / "good.safetensors"
    assert main(["export", concept, "--run", run_id, "--step", "5", "--out", str(out)]) == 0, capsys.readouterr().err
    assert torch.isfinite(read_embedding(out).vectors).all()


def test_many_small_generation_jobs_all_complete_once(engine_home, concept, tmp_path, monkeypatch):
    """Load: a burst of queued generation jobs; none lost, none duplicated."""
    from helpers import TEST_HANDLERS

    monkeypatch.setenv("TISTUDIO_EXTRA_HANDLERS", TEST_HANDLERS)
    count, opened = 50, tmp_path / "open"
    gate = call("submit", "gate", params={"file": str(opened)}, home=engine_home)  # the burst queues behind it
    ids = [call("submit", "generate", params={"prompt": f"a photo of a cat number {i}", "n": 1, "steps": 1,
                                              "seed": i, "mode": "sd", "resolution": 16,
                                              "out_dir": str(tmp_path / "out" / str(i))},
                home=engine_home) for i in range(count)]
    assert len(set(ids)) == count
    queued = {run["id"]: run["status"] for run in call("jobs", home=engine_home)}
    assert [queued[i] for i in ids] == ["queued"] * count
    opened.touch()
    statuses = [call("wait", i, home=engine_home) for i in [gate, *ids]]
    assert statuses.count("done") == count + 1
    pngs = sorted((tmp_path / "out").rglob("*.png"))
    assert len(pngs) == count  # exactly one image per job
