"""The engine on a Ray cluster (the `cluster` extra): a local cluster on this CPU machine, two
logical GPUs, shared by every test of the module (it takes ~10 s to start).

A train job through Ray ends where the same run trained here ends, bit for bit (the local
engine ends there too: tests/test_runs.py); a kill -9 of the Ray worker mid-run is retried
by Ray and resumes from its checkpoint, bit for bit; cancel reaches a Ray run; the engine
refuses a data directory the nodes do not share.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.store import runs as jobs
from engine.wire.client import EngineClient, call
from helpers import TEST_HANDLERS, make_images, scratch_engine_home

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"steps": 30, "save_every": 5, "preview_every": 0, "log_every": 1, "seed": 5}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """`ray start --head` with two logical GPUs, in its own session so that every process it
    starts goes when the module ends.  Yields its address."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rayt-")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    log = open(Path(temp) / "ray-start.log", "w")  # closed below
    proc = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--num-gpus=2",
                             f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        _wait_for_port(port, proc, Path(temp) / "ray-start.log")
        yield address
    finally:
        # SIGKILL at once: on SIGTERM a Ray node drains for up to 30 s before it stops.
        _kill_session(proc.pid)
        proc.wait(timeout=30)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid`: `ray start` and all it started (its workers
    run in process groups of their own)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == sid:
                    os.kill(int(entry.name), signal.SIGKILL)


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            time.sleep(2.0)  # the GCS answers before the raylet has registered the node
            return
        time.sleep(0.3)
    pytest.fail(f"ray start did not listen on {port}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_home(cluster):
    """The data directory of the module's engine on the cluster.  Its tests share that engine
    (they run in the same environment): it joins the cluster once, and the actors they find
    free are warm.  Stopped, and every engine process for it killed, when the module ends."""
    with scratch_engine_home() as path:  # short: the engine's socket lives in it
        yield path
        with contextlib.suppress(Exception):
            call("stop", force=True, home=path, start=False)


@pytest.fixture
def on_ray(cluster, ray_home, monkeypatch):
    monkeypatch.setenv("TISTUDIO_HOME", str(ray_home))
    monkeypatch.setenv("TISTUDIO_ENGINE_IDLE", "60")
    monkeypatch.setenv("TISTUDIO_RAY_ADDRESS", cluster)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as Ray gives each actor
    monkeypatch.setenv("TISTUDIO_EXTRA_HANDLERS", TEST_HANDLERS)
    return ray_home


def _add_concept(home: Path) -> None:
    """The concept "toy" (once: the module's tests share their data directory)."""
    from engine.sd.models import load_tokenizer
    from engine.store.library import Library

    if (home / "concepts" / "toy").is_dir():
        return
    images = make_images(Path(tempfile.mkdtemp(prefix="imgs-", dir=home)), count=3)
    Library(home).add("toy", images, "cat", tokenizer=load_tokenizer())


def _embedding(home: Path, run_id: str):
    from engine.sd.formats import read_embedding

    return read_embedding(jobs.load_run(jobs.find_run(home, run_id))["embedding"]).vectors


def _events(home: Path, run_id: str) -> list[dict]:
    return jobs.EventLog(jobs.find_run(home, run_id) / "events.jsonl").read()


_UNINTERRUPTED: dict = {}  # the reference embedding, made once for the module's tests


def _uninterrupted(model, home: Path, where: Path):
    """The same run trained in this process, start to finish, on one thread as each actor has
    (OMP_NUM_THREADS=1); the same images (make_images is seeded) and params give the same
    embedding in any home."""
    if "embedding" not in _UNINTERRUPTED:
        import torch

        from engine.inversion.train import train
        from engine.sd.formats import read_embedding
        from engine.store.library import Library
        from engine.worker.sweeps import train_config_from

        concept = Library(home).get("toy")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            final = train(model, train_config_from(dict(PARAMS), concept), where, concept.images)
        finally:
            torch.set_num_threads(threads)
        _UNINTERRUPTED["embedding"] = read_embedding(final).vectors
    return _UNINTERRUPTED["embedding"]


async def _follow_until_step(client: EngineClient, run_id: str, step: int) -> list[dict]:
    seen = []
    stream = client.events(run_id)
    try:
        async for event in stream:
            seen.append(event)
            if event["type"] == "step" and event["step"] >= step:
                return seen
    finally:
        await stream.aclose()
    raise AssertionError(f"run {run_id} ended before step {step}")


def test_a_train_job_through_ray_equals_the_uninterrupted_run_and_streams_its_events(on_ray, tiny_model, tmp_path):
    import torch

    _add_concept(on_ray)

    async def go():
        client = await EngineClient(on_ray).connect()
        status = await client.status()
        assert status["backend"]["kind"] == "ray" and status["backend"]["workers"] == 2
        run_id = await client.submit("train", concept="toy", params=PARAMS)
        live = await _follow_until_step(client, run_id, 3)  # events stream back while it runs
        assert [e["status"] for e in live if e["type"] == "status"] == ["queued", "running"]
        busy = await client.status()
        worker = next(w for w in busy["workers"] if w["job"] == run_id)
        assert worker["backend"] == "ray" and worker["node"] and worker["pid"] and worker["device"] == "cpu"
        assert await client.wait(run_id) == "done"
        await client.close()  # the engine serves the module's next test
        return run_id

    run_id = asyncio.run(go())
    record = jobs.load_run(jobs.find_run(on_ray, run_id))
    assert record["device"] == "cpu" and record["node"]  # where it ran: the Ray node's address
    assert [e["step"] for e in _events(on_ray, run_id) if e["type"] == "step"] == list(range(1, 31))
    assert torch.equal(_embedding(on_ray, run_id), _uninterrupted(tiny_model, on_ray, tmp_path / "reference"))


def test_kill_9_of_the_ray_worker_mid_run_is_retried_and_resumes_bit_for_bit(on_ray, tiny_model, tmp_path):
    import torch

    _add_concept(on_ray)

    async def go():
        client = await EngineClient(on_ray).connect()
        run_id = await client.submit("train", concept="toy", params=PARAMS)
        await _follow_until_step(client, run_id, 12)
        pid = jobs.load_run(jobs.find_run(on_ray, run_id))["pid"]
        assert pid in {w["pid"] for w in (await client.status(device=False))["workers"]}
        os.kill(pid, signal.SIGKILL)
        assert await client.wait(run_id) == "done"  # Ray restarted the actor and ran the job again
        pids = {w["pid"] for w in (await client.status(device=False))["workers"]}
        assert pid not in pids and len(pids) == 2  # the same slot, a new process
        await client.close()  # the engine serves the module's next test
        return run_id

    run_id = asyncio.run(go())
    events = _events(on_ray, run_id)
    assert [e["status"] for e in events if e["type"] == "status"] == ["queued", "running", "running", "done"]
    assert any("Ray runs it again" in e.get("message", "") for e in events if e["type"] == "log")
    starts = [e["step"] for e in events if e["type"] == "train"]
    assert starts[0] == 0 and starts[1] >= 10  # the retry resumed from a checkpoint, not from scratch
    record = jobs.load_run(jobs.find_run(on_ray, run_id))
    assert record["attempts"] == 2 and record["status"] == "done"
    assert torch.equal(_embedding(on_ray, run_id), _uninterrupted(tiny_model, on_ray, tmp_path / "reference"))


def test_cancel_reaches_a_ray_run(on_ray):
    async def go():
        client = await EngineClient(on_ray).connect()
        run_id = await client.submit("sleep", params={"seconds": 60, "steps": 600})
        stream = client.events(run_id)
        async for event in stream:
            if event["type"] == "step":
                break
        await stream.aclose()
        asked = time.monotonic()
        assert await client.cancel(run_id) == "cancelling"
        assert await client.wait(run_id) == "cancelled"
        assert time.monotonic() - asked < 10  # it stopped itself: nobody had to kill it
        result = jobs.load_run(jobs.find_run(on_ray, run_id))
        assert result["step"] < 600
        again = await client.submit("echo")  # the same warm actors go on taking jobs
        assert await client.wait(again) == "done"
        await client.close()  # the engine serves the module's next test

    asyncio.run(go())


def test_a_data_directory_the_nodes_do_not_share_is_refused(cluster, engine_home, monkeypatch, tmp_path):
    from engine.errors import UserError
    from engine.server.ray_workers import check_shared_storage, gpu_nodes

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address=cluster, namespace="tistudio-test")
    try:
        nodes = gpu_nodes()
        assert nodes
        check_shared_storage(engine_home, nodes)  # this one is shared: every node sees it
        elsewhere = tmp_path / "what-the-node-sees-at-that-path"  # another disk behind the same name
        elsewhere.mkdir()
        with pytest.raises(UserError, match=r"is not shared storage: node .* did not appear here; put it on storage"):
            check_shared_storage(engine_home, nodes, task_dir=elsewhere)
        with pytest.raises(UserError, match=r"node .* could not write there"):
            check_shared_storage(engine_home, nodes, task_dir=tmp_path / "not-mounted-there")
    finally:
        ray.shutdown()


def test_a_cluster_that_cannot_be_joined_is_one_clear_line(engine_home, monkeypatch):
    from engine.errors import UserError
    from engine.server.ray_workers import RayWorkers

    def refused(**kwargs):
        try:
            raise RuntimeError("ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken")
        except RuntimeError as exc:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from exc

    def absent(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")

    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(UserError, match="refused the engine's token: .*RAY_AUTH_MODE=token"):
        RayWorkers(engine_home, "10.0.0.1:6379")._connect()
    monkeypatch.setattr(ray, "init", absent)
    with pytest.raises(UserError, match=r"could not join the Ray cluster at '10.0.0.1:6379' .*`ray start --head`"):
        RayWorkers(engine_home, "10.0.0.1:6379")._connect()
