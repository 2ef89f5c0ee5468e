"""The engine server's units on their own: the queue, the fan-out, the worker supervisor, the
ledger, the device probe."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import time

import pytest

from engine.devices import probe as device_probe
from engine.server.fanout import Subscriptions, follow
from engine.server.ledger import StatusLedger
from engine.server.queue import Job, JobQueue
from engine.server.supervisor import WorkerSupervisor
from engine.store import runs as jobs
from engine.wire import protocol
from helpers import TEST_HANDLERS

pytestmark = pytest.mark.timeout(60)


def _job(run_id: str) -> Job:
    return Job(run_id, run_dir=None, kind="echo", concept=None, params={})


# ---------------------------------------------------------------------------
# The queue


async def test_the_queue_is_first_in_first_out_and_knows_every_unsettled_job():
    queue = JobQueue()
    a, b, c = _job("a"), _job("b"), _job("c")
    assert [queue.push(j) for j in (a, b, c)] == [1, 2, 3]
    assert queue.positions() == {"a": 1, "b": 2, "c": 3} and len(queue) == 3
    assert queue.remove(b) and not queue.remove(b)
    assert await queue.pop() is a
    assert queue.get("a") is a and a not in queue  # running: no longer waiting, still active
    queue.settled(a)
    assert queue.get("a") is None and queue.get("b") is b  # b is removed from the line, not settled
    assert queue.drain() == [c] and len(queue) == 0


async def test_pop_waits_for_a_job_to_arrive():
    queue = JobQueue()
    waiter = asyncio.create_task(queue.pop())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    job = _job("late")
    queue.push(job)
    assert await asyncio.wait_for(waiter, 1) is job


# ---------------------------------------------------------------------------
# The fan-out


class _Writer:
    """Collects what a subscription writes, as decoded lines."""

    def __init__(self):
        self.lines: list[dict] = []

    def write(self, data: bytes) -> None:
        self.lines += [protocol.decode(line) for line in data.splitlines()]

    async def drain(self) -> None:
        pass


async def test_every_listener_gets_each_new_event_once_then_the_end():
    subs = Subscriptions()
    writers = [_Writer(), _Writer()]
    with subs.listen("r") as q1, subs.listen("r") as q2:
        assert len(subs) == 1
        for seq in (1, 2, 2, 3):  # a duplicate seq (replayed and live) is sent once
            subs.publish("r", {"seq": seq, "type": "log"})
        subs.publish("other", {"seq": 9, "type": "log"})  # another run's listeners only
        subs.end("r", "failed", "the disk is full")
        await asyncio.gather(follow(q1, writers[0], last_seq=0), follow(q2, writers[1], last_seq=2))
    assert len(subs) == 0  # the listeners are gone with their context
    first, second = (w.lines for w in writers)
    assert [e["seq"] for line in first[:-1] for e in line["events"]] == [1, 2, 3]
    assert [e["seq"] for line in second[:-1] for e in line["events"]] == [3]  # it had 1 and 2 already
    for lines in (first, second):
        assert protocol.StreamEnd.from_wire(lines[-1]) == protocol.StreamEnd("failed", "the disk is full")


# ---------------------------------------------------------------------------
# The worker supervisor, with a real worker process


@pytest.fixture
def worker_home(engine_home, monkeypatch):
    monkeypatch.setenv("TISTUDIO_EXTRA_HANDLERS", TEST_HANDLERS)
    return engine_home


async def test_the_supervisor_runs_a_job_notices_its_worker_die_and_starts_a_fresh_one(worker_home):
    heard: list[protocol.Message] = []
    exits: list[tuple[int, int | None, str | None]] = []
    supervisor = WorkerSupervisor(worker_home, on_message=lambda w, m: heard.append(m),
                                  on_exit=lambda w, code, run_id: exits.append((w.pid, code, run_id)))
    run_dir = jobs.create_run(worker_home, {"kind": "echo", "params": {"message": "hi"}})
    spec = protocol.JobSpec(run_dir.name, str(run_dir), "echo", params={"message": "hi"})
    worker = await supervisor.start_job(spec)
    assert supervisor.in_flight == run_dir.name and supervisor.pid == worker.pid
    await _until(lambda: any(isinstance(m, protocol.Finished) for m in heard))
    finished = next(m for m in heard if isinstance(m, protocol.Finished))
    assert (finished.run_id, finished.status) == (run_dir.name, "done")
    assert supervisor.in_flight is None  # idle again, same worker
    assert jobs.load_run(run_dir)["status"] == "done"

    sleeper = jobs.create_run(worker_home, {"kind": "sleep"})
    await supervisor.start_job(protocol.JobSpec(sleeper.name, str(sleeper), "sleep", params={"seconds": 30}))
    os.kill(worker.pid, signal.SIGKILL)
    await _until(lambda: exits)
    assert exits == [(worker.pid, -signal.SIGKILL, sleeper.name)]  # told which run it took down
    assert supervisor.worker is None and supervisor.in_flight is None
    fresh = await supervisor.ensure()
    assert fresh.pid != worker.pid
    await supervisor.stop()
    assert exits[-1] == (fresh.pid, 0, None)


async def _until(pred, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------
# The ledger: how runs ended, in memory when the disk refuses


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_the_ledger_holds_what_the_disk_refuses_and_writes_it_when_it_can(tmp_path, monkeypatch):
    run_dir = jobs.create_run(tmp_path, {"kind": "echo"})
    jobs.set_status(run_dir, "running", pid=123)
    ledger = StatusLedger(tmp_path)
    assert ledger.health() == {"writable": True, "error": None, "since": None, "unsaved": []}

    monkeypatch.setattr(jobs, "settle_run", _disk_full)
    assert ledger.settle(run_dir, "failed", "boom") is None  # never raises
    health = ledger.health()
    assert not health["writable"] and "disk is full" in health["error"] and health["unsaved"] == [run_dir.name]
    listed = ledger.overlay(jobs.load_run(run_dir))
    assert (listed["status"], listed["error"], listed["pid"]) == ("failed", "boom", None) and listed["unsaved"]
    assert jobs.load_run(run_dir)["status"] == "running"  # the disk still says so
    ledger.retry()
    assert ledger.unsaved  # still refused: still held

    monkeypatch.undo()  # room again
    ledger.retry()
    assert ledger.health()["writable"] and not ledger.unsaved
    record = jobs.load_run(run_dir)
    assert (record["status"], record["error"], record["pid"]) == ("failed", "boom", None)
    assert jobs.last_status(run_dir) == "failed"


def test_settling_adopts_a_final_status_the_log_already_has(tmp_path):
    run_dir = jobs.create_run(tmp_path, {"kind": "echo"})
    jobs.set_status(run_dir, "running", pid=123)
    jobs.EventLog(run_dir / "events.jsonl").append({"type": "status", "status": "failed", "error": "late"})
    ledger = StatusLedger(tmp_path)
    assert ledger.settle(run_dir, "failed", "late") is None  # no second event: run.json catches up
    assert [e["status"] for e in jobs.EventLog(run_dir / "events.jsonl").read()] == ["running", "failed"]
    assert jobs.load_run(run_dir)["status"] == "failed" and jobs.load_run(run_dir)["pid"] is None


def test_other_refused_writes_are_retried_too(tmp_path):
    ledger = StatusLedger(tmp_path)
    attempts = []

    def write():
        attempts.append(1)
        if len(attempts) == 1:
            _disk_full()

    assert not ledger.write("the pid file", write) and not ledger.health()["writable"]
    ledger.retry()
    assert len(attempts) == 2 and ledger.health()["writable"]


def test_an_event_the_disk_cuts_short_is_skipped_by_readers_and_uses_no_seq(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    log = jobs.EventLog(path)
    log.append({"type": "log", "i": 1})
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(OSError) as caught:
        log.append({"type": "log", "i": 2})
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    log.append({"type": "log", "i": 3})
    log.close()
    assert [(e["seq"], e["i"]) for e in jobs.EventLog(path).read()] == [(1, 1), (2, 3)]


# ---------------------------------------------------------------------------
# The device probe: what a worker would use, without torch


@pytest.fixture
def two_gpus(tmp_path, monkeypatch):
    """A fake nvidia-smi with two GPUs, and a torch that (as far as its files say) has CUDA."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho '0, GPU-aaaa-1111, NVIDIA A100, 81920, 1024'\n"
                   "echo '1, GPU-bbbb-2222, NVIDIA H200, 143771, [N/A]'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(device_probe, "torch_has_cuda", lambda: True)


def test_the_probe_finds_the_gpu_a_worker_would_use(two_gpus):
    first = device_probe.probe({})
    assert first == {"device": "cuda:0", "name": "NVIDIA A100", "source": "nvidia-smi", "vram_total": 81920 * 2**20,
                     "vram_used_device": 1024 * 2**20, "gpus": 2}
    reordered = device_probe.probe({"CUDA_VISIBLE_DEVICES": "GPU-bbbb,0"})  # CUDA's order: by UUID prefix
    assert reordered["name"] == "NVIDIA H200" and "vram_used_device" not in reordered and reordered["gpus"] == 2
    assert device_probe.probe({"CUDA_VISIBLE_DEVICES": "1", "TISTUDIO_DEVICE": "cuda:0"})["name"] == "NVIDIA H200"
    assert "refuse" in device_probe.probe({"TISTUDIO_DEVICE": "cuda:5"})["note"]
    assert device_probe.probe({"TISTUDIO_DEVICE": "cpu"}) == {"device": "cpu", "source": "TISTUDIO_DEVICE"}
    hidden = device_probe.probe({"CUDA_VISIBLE_DEVICES": ""})
    assert hidden["device"] == "cpu" and "hides every GPU" in hidden["note"]


def test_the_probe_says_when_torch_cannot_use_the_gpus(two_gpus, monkeypatch):
    monkeypatch.setattr(device_probe, "torch_has_cuda", lambda: False)
    cpu = device_probe.probe({})
    assert cpu["device"] == "cpu" and "no CUDA" in cpu["note"] and not any(k.startswith("vram") for k in cpu)


def test_the_environment_that_matters(monkeypatch):
    env = {"CUDA_VISIBLE_DEVICES": "0", "HF_HUB_OFFLINE": "1", "TISTUDIO_MODEL": "builtin:tiny", "HOME": "/root",
           "TISTUDIO_ENGINE_PID": "7", "PATH": "/bin"}
    assert device_probe.environment(env) == {"CUDA_VISIBLE_DEVICES": "0", "HF_HUB_OFFLINE": "1",
                                             "TISTUDIO_MODEL": "builtin:tiny"}


def test_a_full_disk_is_recognised_however_a_library_reports_it(tmp_path):
    from safetensors import SafetensorError

    from engine.store.paths import disk_full_message, is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(ValueError("bad"))
    message = disk_full_message(tmp_path, "resume it")
    assert message.startswith(f"the disk is full ({tmp_path} has ") and message.endswith("then resume it")
    assert "\n" not in message


async def test_a_job_never_goes_to_a_worker_that_died_before_the_engine_noticed(worker_home):
    """The race: a job handed over in the instant between a worker's death and its reader seeing
    stdout close went to the dead worker and ended interrupted.  Now the supervisor asks the
    system whether its worker is alive before it hands a job over."""
    exits: list[tuple[int, str | None]] = []
    supervisor = WorkerSupervisor(worker_home, on_exit=lambda w, code, run_id: exits.append((w.pid, run_id)))
    first = await supervisor.ensure()
    os.kill(first.pid, signal.SIGKILL)
    deadline = asyncio.get_running_loop().time() + 5
    while jobs.pid_alive(first.pid):  # blocking waits: the event loop, and so the reader, does not run
        assert asyncio.get_running_loop().time() < deadline
        time.sleep(0.01)
    assert supervisor.worker is first  # the engine has not noticed yet
    run_dir = jobs.create_run(worker_home, {"kind": "echo", "params": {"message": "hi"}})
    worker = await supervisor.start_job(protocol.JobSpec(run_dir.name, str(run_dir), "echo",
                                                         params={"message": "hi"}))
    assert worker.pid != first.pid and exits == [(first.pid, None)]
    await _until(lambda: jobs.load_run(run_dir)["status"] == "done")
    await supervisor.stop()
