"""Training runs through the real engine: kill -9 and resume, detach and re-attach, two clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from engine.sd.formats import read_embedding
from engine.store.library import Library
from engine.wire.client import call

pytestmark = pytest.mark.timeout(300)

PARAMS = {"steps": 20, "save_every": 5, "preview_every": 0, "log_every": 5, "seed": 11}


def _add_concept(home: Path, name: str, image_dir: Path) -> None:
    from engine.sd.models import load_tokenizer

    Library(home).add(name, image_dir, "cat", tokenizer=load_tokenizer())


def _uninterrupted(tiny_model, home: Path, name: str, tmp_path: Path) -> torch.Tensor:
    """The reference: the same config trained in-process, start to finish."""
    from engine.inversion.train import train
    from engine.worker.sweeps import train_config_from

    concept = Library(home).get(name)
    config = train_config_from(dict(PARAMS), concept)
    return read_embedding(train(tiny_model, config, tmp_path / "reference", concept.images)).vectors


def _run(home: Path, run_id: str) -> dict:
    return next(j for j in call("jobs", home=home) if j["id"] == run_id)


def test_kill_9_at_several_points_then_resume_ends_where_uninterrupted_ends(
        engine_home, tiny_model, image_dir, tmp_path, monkeypatch):
    _add_concept(engine_home, "toy", image_dir)
    expected = _uninterrupted(tiny_model, engine_home, "toy", tmp_path)
    # the worker SIGKILLs itself: after step 7, halfway through writing checkpoint 10, after step 17
    monkeypatch.setenv("TISTUDIO_FAULTS", "step@7,checkpoint.mid_write@10,step@17")
    monkeypatch.setenv("TISTUDIO_FAULTS_STATE", str(tmp_path / "faults"))
    run_id = call("submit", "train", concept="toy", params=PARAMS, home=engine_home)
    statuses = [call("wait", run_id, home=engine_home)]
    while statuses[-1] == "interrupted" and len(statuses) < 6:
        # nothing partial is ever visible under a final name
        run_dir = Path(_run(engine_home, run_id)["run_dir"])
        for ckpt in (run_dir / "checkpoints").glob("step-*"):
            assert (ckpt / "state.safetensors").is_file() and (ckpt / "meta.json").is_file()
        call("submit", resume=run_id, home=engine_home)
        statuses.append(call("wait", run_id, home=engine_home))
    assert statuses == ["interrupted", "interrupted", "interrupted", "done"]
    assert len(list((tmp_path / "faults").iterdir())) == 3  # every fault really fired
    final = Path(_run(engine_home, run_id)["embedding"])
    assert torch.equal(read_embedding(final).vectors, expected)


def test_detached_run_outlives_its_cli_and_a_new_client_replays_everything(engine_home, image_dir):
    _add_concept(engine_home, "toy", image_dir)
    env = {**os.environ, "TISTUDIO_HOME": str(engine_home)}
    proc = subprocess.run([sys.executable, "-m", "tistudio.cli", "train", "toy", "--steps", "10",
                           "--save-every", "5", "--preview-every", "0", "--detach"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip()
    assert run_id and "\n" not in run_id  # the run id alone on stdout
    # the CLI has exited; the run goes on in the engine. A fresh client sees it all.
    events = _collect_events(engine_home, run_id)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e["status"] for e in events if e["type"] == "status"][0] == "queued"
    assert events[-1]["type"] == "status" and events[-1]["status"] == "done"
    assert [e["step"] for e in events if e["type"] == "step"][-1] == 10


def _collect_events(home: Path, run_id: str) -> list[dict]:
    import asyncio

    from engine.wire.client import EngineClient

    async def go():
        client = EngineClient(home)
        await client.connect()
        try:
            return [e async for e in client.events(run_id)]
        finally:
            await client.close()

    return asyncio.run(go())


def test_two_clients_submitting_at_once_both_run_in_order(engine_home, image_dir, tmp_path):
    _add_concept(engine_home, "one", image_dir)
    _add_concept(engine_home, "two", image_dir)
    call("ping", home=engine_home)  # start it once; both clients then race on submit
    ids: dict[str, str] = {}

    def submit(name):
        ids[name] = call("submit", "train", concept=name, params={**PARAMS, "steps": 10}, home=engine_home)

    threads = [threading.Thread(target=submit, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {call("wait", ids[n], home=engine_home) for n in ids} == {"done"}
    runs = [_run(engine_home, ids[n]) for n in ("one", "two")]
    first, second = sorted(runs, key=lambda r: r["started"])
    assert first["finished"] <= second["started"]  # one GPU job at a time
    for run in runs:
        assert read_embedding(run["embedding"]).vectors.shape == (1, 32)
        log = Path(run["run_dir"]) / "events.jsonl"
        assert all(json.loads(line) for line in log.read_text().splitlines())


def test_a_sweep_trains_members_together_survives_kill_9_and_resumes(engine_home, image_dir, tmp_path, monkeypatch):
    _add_concept(engine_home, "toy", image_dir)
    monkeypatch.setenv("TISTUDIO_FAULTS", "step@12")
    monkeypatch.setenv("TISTUDIO_FAULTS_STATE", str(tmp_path / "faults"))
    sweep_id = call("submit", "sweep", concept="toy", params={**PARAMS, "seeds": [1, 2], "inits": ["cat", "dog"]},
                    home=engine_home)
    assert call("wait", sweep_id, home=engine_home) == "interrupted"
    members = _run(engine_home, sweep_id)["members"]
    assert len(members) == 4
    assert {_run(engine_home, m)["status"] for m in members} == {"interrupted"}  # settled with their parent
    call("submit", resume=sweep_id, home=engine_home)
    assert call("wait", sweep_id, home=engine_home) == "done"
    runs = [_run(engine_home, m) for m in members]
    assert {r["status"] for r in runs} == {"done"}
    assert sorted((r["params"]["seed"], r["params"]["init"]) for r in runs) == [
        (1, "cat"), (1, "dog"), (2, "cat"), (2, "dog")]
    vectors = [read_embedding(r["embedding"]).vectors for r in runs]
    assert all(not torch.equal(vectors[0], v) for v in vectors[1:])
