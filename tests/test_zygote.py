"""Warm workers (engine.server.zygote): every worker after the first torch job is forked from a zygote that
has imported torch once, in its own device's environment; a dead zygote is replaced; with
TISTUDIO_WORKER_FORK=0 each worker starts the plain way."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine.devices.pool import cpu_threads
from engine.store import runs as jobs
from engine.wire.client import call
from helpers import TEST_HANDLERS

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def cpu_pair(engine_home, monkeypatch):
    """An engine of its own with two cpu workers and no OMP_NUM_THREADS of the user's: the
    engine picks each worker's threads (engine.devices.pool.cpu_threads)."""
    monkeypatch.setenv("TISTUDIO_DEVICES", "cpu,cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TISTUDIO_WORKER_FORK", raising=False)
    monkeypatch.delenv("TISTUDIO_ZYGOTE", raising=False)  # a zygote of its own, not the suite's
    monkeypatch.setenv("TISTUDIO_EXTRA_HANDLERS", TEST_HANDLERS)
    return engine_home


def _result(home, run_id: str) -> dict:
    assert call("wait", run_id, home=home) == "done"
    return jobs.load_run(jobs.find_run(home, run_id))["result"]


def _fork(home) -> dict:
    return call("status", home=home)["backend"]["fork"]


def _until_gone(home, pid: int) -> None:
    """Until the engine has noticed that worker `pid` died (a job sent before would be interrupted)."""
    deadline = time.monotonic() + 10
    while any(w.get("pid") == pid for w in call("status", home=home)["workers"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("PPid:")).split()[1])


def test_a_worker_after_the_first_torch_job_is_forked_warm_in_its_own_environment(cpu_pair, image_dir):
    from engine.sd.models import load_tokenizer
    from engine.store.library import Library

    Library(cpu_pair).add("toy", image_dir, "cat", tokenizer=load_tokenizer())
    first = call("submit", "train", concept="toy", params={"steps": 2, "preview_every": 0}, home=cpu_pair)
    assert call("wait", first, home=cpu_pair) == "done"
    status = call("status", home=cpu_pair)
    fork = status["backend"]["fork"]
    assert fork["zygote"] and fork["preloaded"] and fork["off"] is None
    [worker] = [w["pid"] for w in status["workers"] if w.get("pid")]  # one job: one worker started
    assert _parent(worker) == fork["zygote"]
    os.kill(worker, signal.SIGKILL)  # the crash every restart follows
    _until_gone(cpu_pair, worker)

    probe = _result(cpu_pair, call("submit", "process", home=cpu_pair))
    assert probe["torch_before"], probe  # warm: torch was there before the job asked
    assert probe["ppid"] == fork["zygote"] and probe["pid"] != worker and probe["name"] == "tistudio-worker"
    # OpenMP read its thread count when the zygote imported torch; the worker still gets its own share
    assert probe["threads"] == (cpu_threads(["cpu", "cpu"]) or os.cpu_count()) and probe["device"] == "cpu"
    assert "forked warm from zygote" in _engine_status_text(cpu_pair)


def _engine_status_text(home) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tistudio", "engine", "status"], capture_output=True, text=True,
                         env=dict(os.environ, TISTUDIO_HOME=str(home)), check=True)
    return out.stdout


def test_a_dead_zygote_is_replaced_and_no_job_is_lost(cpu_pair):
    before = _result(cpu_pair, call("submit", "process", home=cpu_pair))
    zygote = _fork(cpu_pair)["zygote"]
    assert before["ppid"] == zygote and not before["torch_before"]  # a torch-free kind: forked cold
    os.kill(zygote, signal.SIGKILL)  # its workers go with it (PR_SET_PDEATHSIG)
    _until_gone(cpu_pair, before["pid"])
    after = _result(cpu_pair, call("submit", "process", home=cpu_pair))
    replaced = _fork(cpu_pair)["zygote"]
    assert replaced not in (None, zygote) and after["ppid"] == replaced and after["pid"] != before["pid"]


def test_with_forking_off_each_worker_starts_on_its_own(cpu_pair, monkeypatch):
    monkeypatch.setenv("TISTUDIO_WORKER_FORK", "0")
    probe = _result(cpu_pair, call("submit", "process", home=cpu_pair))
    server = call("status", home=cpu_pair)["pid"]
    assert probe["ppid"] == server and not probe["torch_before"]
    assert _fork(cpu_pair) == {"zygote": None, "preloaded": False, "off": "TISTUDIO_WORKER_FORK=0"}
    assert "each starts on its own (TISTUDIO_WORKER_FORK=0)" in _engine_status_text(cpu_pair)


def test_one_zygote_serves_several_engines_and_kills_only_the_workers_of_an_engine_that_goes(
        engine_home, monkeypatch, tmp_path):
    """The suite's own zygote (tests/shared_zygote.py, `--listen`): two engines fork their workers
    there, already warm; killing one engine kills its worker and leaves the other's; an engine of
    another PYTHONPATH is refused and starts its own."""
    from engine.store.runs import pid_alive
    from helpers import scratch_engine_home

    assert os.environ.get("TISTUDIO_ZYGOTE"), "the suite starts one (tests/shared_zygote.py)"
    monkeypatch.setenv("TISTUDIO_EXTRA_HANDLERS", TEST_HANDLERS)
    monkeypatch.delenv("TISTUDIO_WORKER_FORK", raising=False)
    with scratch_engine_home() as other:
        probes = [_result(home, call("submit", "process", home=home)) for home in (engine_home, other)]
        shared = _fork(engine_home)["zygote"]
        assert _fork(other)["zygote"] == shared and shared not in (call("status", home=h)["pid"]
                                                                  for h in (engine_home, other))
        assert all(p["ppid"] == shared and p["torch_before"] and p["name"] == "tistudio-worker" for p in probes)
        kill_engines_server(other)
        deadline = time.monotonic() + 10
        while pid_alive(probes[1]["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(probes[1]["pid"]) and pid_alive(probes[0]["pid"]) and pid_alive(shared)

    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # what the zygote did not import with
    with scratch_engine_home() as third:
        probe = _result(third, call("submit", "process", home=third))
        assert probe["ppid"] == call("status", home=third)["pid"]  # started the plain way
        assert "it serves" in _fork(third)["off"]

def kill_engines_server(home) -> None:
    """SIGKILL the engine server of `home` only (what a crash or `kill -9` does)."""
    os.kill(call("status", home=home)["pid"], signal.SIGKILL)
