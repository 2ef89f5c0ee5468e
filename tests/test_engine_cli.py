"""`tistudio engine status` and `tistudio runs`: readable, and they never start an engine."""

from __future__ import annotations

import json
import time

import pytest

from engine.store import runs as jobs
from engine.wire.client import call
from helpers import TEST_HANDLERS, engine_pids
from tistudio.cli import main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def home(engine_home, monkeypatch):
    monkeypatch.setenv("TISTUDIO_EXTRA_HANDLERS", TEST_HANDLERS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return engine_home


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_engine_status_without_an_engine_starts_none_and_shows_what_one_would_see(home, capsys):
    code, out, err = cli(capsys, "engine", "status")
    assert code == 0 and err == ""
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["engine"].startswith("not running") and str(home) in lines["engine"]
    assert lines["device"].split()[0] in ("cpu", "cuda:0") and "what a worker started now would use" in lines["device"]
    assert "HF_HUB_OFFLINE=1" in lines["env"] and f"TISTUDIO_HOME={home}" in lines["env"]
    assert "unset: CUDA_VISIBLE_DEVICES, TRANSFORMERS_OFFLINE" in lines["env"]
    code, out, _ = cli(capsys, "engine", "status", "--json")
    state = json.loads(out)
    assert state["engine"] == "not running" and state["device"]["device"]
    assert state["environment"]["HF_HUB_OFFLINE"] == "1"
    assert engine_pids(home) == []  # nothing was started to answer


def test_runs_reads_the_disk_with_no_engine_and_flags_runs_a_dead_engine_left(home, capsys):
    (home / "concepts" / "cat").mkdir(parents=True)
    (home / "concepts" / "cat" / "concept.toml").write_text('name = "cat"\n')
    done = jobs.create_run(home, {"kind": "train", "concept": "cat", "params": {}})
    jobs.set_status(done, "done")
    left = jobs.create_run(home, {"kind": "train", "concept": "cat", "params": {}})
    jobs.set_status(left, "running", pid=2**22 + 7)
    code, out, err = cli(capsys, "runs", "--json")
    assert code == 0 and err == ""
    rows = {r["id"]: r for r in json.loads(out)}
    assert rows[done.name]["status"] == "done" and not rows[done.name].get("stale")
    assert rows[left.name]["status"] == "running" and rows[left.name]["stale"]
    code, out, _ = cli(capsys, "runs")
    assert code == 0 and done.name in out and "running*" in out and "no engine is running" in out
    assert engine_pids(home) == []


def test_engine_status_of_an_idle_engine_and_of_a_busy_one(home, capsys):
    call("ping")  # an engine, idle, with no worker yet
    code, out, _ = cli(capsys, "engine", "status")
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert code == 0 and lines["engine"].startswith("running · pid ")
    assert lines["job"].startswith("none · no worker") and lines["storage"] == "writable"
    assert "HF_HUB_OFFLINE=1" in lines["env"]
    assert call("status", device=False, start=False)["worker_pid"] is None  # the probe started none

    run_id = call("submit", "sleep", params={"seconds": 20, "steps": 200})
    deadline = time.monotonic() + 30
    while (call("status", device=False)["running"] or {}).get("step", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    code, out, _ = cli(capsys, "engine", "status")
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert code == 0 and "{" not in out  # readable, not a raw dict
    assert lines["job"].startswith(f"{run_id} · sleep · running · step ") and "/200 · worker pid " in lines["job"]
    state = json.loads(cli(capsys, "engine", "status", "--json")[1])
    assert state["engine"] == "running" and state["running"]["id"] == run_id

    code, out, _ = cli(capsys, "runs", "--json")
    live = {r["id"]: r for r in json.loads(out)}[run_id]
    assert live["status"] == "running" and live["pid"] == state["worker_pid"] and not live.get("stale")
    call("cancel", run_id)
    assert call("wait", run_id) == "cancelled"
    call("stop")
