"""The engine restarted while a client follows a run; two CLIs and the studio's client at once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from engine.wire.client import EngineClient, call
from helpers import TEST_HANDLERS

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def test_kinds(monkeypatch):
    monkeypatch.setenv("TISTUDIO_EXTRA_HANDLERS", TEST_HANDLERS)


def _kill_9_server(home):
    import signal

    pid = int((home / "engine" / "engine.pid").read_text())
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["stop --force", "kill -9"])
def test_attach_survives_an_engine_restart_and_reports_the_run_interrupted(engine_home, test_kinds, how):
    run_id = call("submit", "sleep", params={"seconds": 30, "steps": 300}, home=engine_home)
    env = {**os.environ, "TISTUDIO_HOME": str(engine_home)}
    attach = subprocess.Popen([sys.executable, "-m", "tistudio.cli", "attach", run_id, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = ""
    while not any(json.loads(line).get("type") == "step" for line in seen.splitlines()):  # following it live
        line = attach.stdout.readline()
        assert line, f"attach ended before the run's first step: {attach.communicate()}"
        seen += line
    if how == "kill -9":  # the attached client reconnects, which starts a fresh engine
        _kill_9_server(engine_home)
    else:
        call("stop", force=True, home=engine_home)
    out, err = attach.communicate(timeout=60)
    out = seen + out
    assert attach.returncode == 1, err  # the run ended interrupted: not a success, not a crash
    assert "Traceback" not in err
    statuses = [json.loads(line).get("status") for line in out.splitlines() if line.startswith("{")]
    assert [s for s in statuses if s][-1] == "interrupted"
    # a fresh engine serves the whole history, and the run resumes
    assert call("wait", run_id, home=engine_home) == "interrupted"
    call("submit", resume=run_id, params={"seconds": 0.2, "steps": 2}, home=engine_home)
    assert call("wait", run_id, home=engine_home) == "done"


def test_two_clis_and_an_async_client_submit_at_once(engine_home, test_kinds, tmp_path):
    call("ping", home=engine_home)
    env = {**os.environ, "TISTUDIO_HOME": str(engine_home)}
    target = tmp_path / "order.txt"

    def cli_submit(tag):
        code = ("from engine.wire.client import call; import sys; "
                f"print(call('submit', 'counter', params={{'file': {str(target)!r}, 'tag': {tag!r}, 'seconds': 0.3}}))")
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)

    async def studio_submit():
        async with EngineClient(engine_home) as client:
            return await client.submit("counter", params={"file": str(target), "tag": "studio", "seconds": 0.3})

    procs = [cli_submit("cli-a"), cli_submit("cli-b")]
    studio_id = asyncio.run(studio_submit())
    ids = [p.communicate(timeout=60)[0].strip() for p in procs] + [studio_id]
    assert len(set(ids)) == 3
    assert {call("wait", i, home=engine_home) for i in ids} == {"done"}
    lines = target.read_text().splitlines()
    assert sorted(lines) == sorted(f"{w} {t}" for w in ("start", "end") for t in ("cli-a", "cli-b", "studio"))
    for i in range(0, 6, 2):  # one job at a time: every start is followed by its own end
        assert lines[i].split()[1] == lines[i + 1].split()[1] and lines[i].startswith("start")


def test_an_idle_engine_from_older_code_is_replaced_but_a_busy_one_is_kept(engine_home, test_kinds, monkeypatch):
    import engine.wire.client as client_mod

    real = client_mod.code_version
    first = call("ping", home=engine_home)["pid"]
    monkeypatch.setattr(client_mod, "code_version", lambda: "0.0.0+newer")  # as if we were upgraded
    second = call("ping", home=engine_home)["pid"]
    assert second != first  # the idle stale engine made way
    monkeypatch.setattr(client_mod, "code_version", real)
    assert call("ping", home=engine_home)["pid"] == second  # same code: kept
    run_id = call("submit", "sleep", params={"seconds": 3, "steps": 3}, home=engine_home)
    monkeypatch.setattr(client_mod, "code_version", lambda: "0.0.0+newest")
    assert call("ping", home=engine_home)["pid"] == second  # busy: its job matters more
    assert call("wait", run_id, home=engine_home) == "done"
