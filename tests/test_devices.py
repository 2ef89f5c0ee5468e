"""One worker per device.

Units: TISTUDIO_DEVICES, which worker a job fits, how CPU workers share the cores, how a
sweep is split into groups.  Then two `cpu` workers for real: jobs side by side, a
device no worker has refused at submit, a kill -9 that takes down only its own job, two
training runs side by side that each end bit for bit where their solo runs end, and a
sweep split over both workers (also killed in one group, then resumed) whose members
end where their solo runs end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest

from engine.devices import probe as device_probe
from engine.devices.pool import check_request, cpu_threads, engine_devices, fits, worker_env
from engine.errors import UserError
from engine.server import placement
from engine.store import runs as jobs
from engine.store.sweeps import chunk
from engine.wire.client import EngineClient, call
from engine.wire.protocol import SweepGroup
from helpers import TEST_HANDLERS

pytestmark = pytest.mark.timeout(300)

PARAMS = {"steps": 20, "save_every": 5, "preview_every": 0, "log_every": 1}


# ---------------------------------------------------------------------------
# Units


def test_the_devices_come_from_tistudio_devices_else_tistudio_device_else_auto(monkeypatch):
    assert engine_devices({"TISTUDIO_DEVICES": "cuda:0, cuda:2"}) == ["cuda:0", "cuda:2"]
    assert engine_devices({"TISTUDIO_DEVICES": "cpu,cpu"}) == ["cpu", "cpu"]
    assert engine_devices({"TISTUDIO_DEVICES": "cuda"}) == ["cuda:0"]
    assert engine_devices({"TISTUDIO_DEVICE": "cpu"}) == ["cpu"]  # the one-device setting: one worker
    monkeypatch.setattr(device_probe, "all_gpus", lambda: [])
    assert engine_devices({}) == engine_devices({"TISTUDIO_DEVICES": "auto"}) == ["cpu"]  # no CUDA: today's worker
    gpus = [device_probe.Gpu(i, f"GPU-{i}", "H200") for i in range(3)]
    monkeypatch.setattr(device_probe, "all_gpus", lambda: gpus)
    monkeypatch.setattr(device_probe, "torch_has_cuda", lambda: True)
    assert engine_devices({}) == ["cuda:0", "cuda:1", "cuda:2"]
    assert engine_devices({"CUDA_VISIBLE_DEVICES": "2,0"}) == ["cuda:0", "cuda:1"]  # torch's numbering
    monkeypatch.setattr(device_probe, "torch_has_cuda", lambda: False)
    assert engine_devices({}) == ["cpu"]  # GPUs, but a CPU build of torch
    with pytest.raises(UserError, match=r"TISTUDIO_DEVICES='cpu,gpu0': 'gpu0' is not a device"):
        engine_devices({"TISTUDIO_DEVICES": "cpu,gpu0"})


def test_a_job_fits_the_workers_of_the_device_it_asks_for():
    assert fits(None, "cuda:1") and fits("cuda", "cuda:1") and fits("cuda:1", "cuda:1") and fits("cpu", "cpu")
    assert not fits("cuda:0", "cuda:1") and not fits("cuda", "cpu") and not fits("cpu", "cuda:0")
    check_request("cuda", ["cuda:0", "cuda:1"])
    with pytest.raises(UserError, match=r"no worker .* 'cuda:3'; its devices: cuda:0, cuda:1 "):
        check_request("cuda:3", ["cuda:0", "cuda:1"])
    with pytest.raises(UserError, match=r"its devices: cpu \("):  # cpu,cpu named once
        check_request("cuda", ["cpu", "cpu"])


def test_cpu_workers_sharing_a_box_split_its_cores():
    assert cpu_threads(["cpu"], cores=8) is None  # alone: torch's default, every core
    assert cpu_threads(["cpu", "cpu"], cores=2) == 1
    assert cpu_threads(["cpu", "cpu", "cpu"], cores=8) == 2
    assert cpu_threads(["cpu"] * 4, cores=2) == 1  # never below one
    assert cpu_threads(["cuda:0", "cpu"], cores=8) is None
    bus = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}  # every worker numbers GPUs as nvidia-smi does
    assert worker_env("cpu", 1, {"PATH": "/bin"}) == {"PATH": "/bin", "TISTUDIO_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
                                                      **bus}
    assert worker_env("cpu", 1, {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"  # the user's choice wins
    assert worker_env("cuda:2", None, {}) == {"TISTUDIO_DEVICE": "cuda:2", **bus}


# nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used --format=csv,noheader,nounits, and -L:
# an A100 in MIG mode with two MIG devices (the second in the pre-R470 UUID form) beside one that is not.
MIG_TABLE = ("0, GPU-5c89852c-d268, NVIDIA A100-SXM4-40GB, 40960, 87\n"
             "1, GPU-7d11aa00-0001, NVIDIA A100-SXM4-40GB, 40960, 0\n")
MIG_LIST = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5c89852c-d268)
  MIG 3g.20gb     Device  0: (UUID: MIG-b5e8d4a1-0000-5000-8000-00000000000a)
  MIG 2g.10gb     Device  1: (UUID: MIG-GPU-5c89852c-d268/2/0)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-7d11aa00-0001)
"""
# A mixed box: bus order (nvidia-smi's) puts the slower card first; CUDA's default would not.
MIXED_TABLE = "0, GPU-aaaa, NVIDIA GeForce RTX 3060, 12288, 300\n1, GPU-bbbb, NVIDIA RTX A6000, 49140, 0\n"


def test_a_mig_device_in_cuda_visible_devices_is_found_and_is_one_device(monkeypatch):
    gpus = device_probe.parse_gpus(MIG_TABLE, MIG_LIST)
    assert [(g.uuid, len(g.migs)) for g in gpus] == [("GPU-5c89852c-d268", 2), ("GPU-7d11aa00-0001", 0)]
    second = "MIG-GPU-5c89852c-d268/2/0"
    [shown] = device_probe.visible(gpus, second)
    assert (shown.uuid, shown.name) == (second, "NVIDIA A100-SXM4-40GB MIG 2g.10gb")
    # CUDA enumerates one MIG device per process; a GPU in MIG mode stands for its first
    first = "MIG-b5e8d4a1-0000-5000-8000-00000000000a"
    assert [d.uuid for d in device_probe.visible(gpus, f"MIG-b5e8,{second}")] == [first]
    assert [d.uuid for d in device_probe.visible(gpus, None)] == [first, "GPU-7d11aa00-0001"]
    monkeypatch.setattr(device_probe, "all_gpus", lambda: gpus)
    monkeypatch.setattr(device_probe, "torch_has_cuda", lambda: True)
    assert engine_devices({"CUDA_VISIBLE_DEVICES": second}) == ["cuda:0"]  # was: no GPU matched, so the CPU
    found = device_probe.probe({"CUDA_VISIBLE_DEVICES": "MIG-b5e8d4a1-0000-5000-8000-00000000000a"})
    assert (found["device"], found["name"]) == ("cuda:0", "NVIDIA A100-SXM4-40GB MIG 3g.20gb")


def test_nvidia_smi_is_asked_for_the_gpus_and_the_mig_devices(tmp_path, monkeypatch):
    """A stand-in nvidia-smi on PATH answers both questions as the real one does."""
    smi = tmp_path / "nvidia-smi"
    (tmp_path / "table").write_text(MIG_TABLE)
    (tmp_path / "list").write_text(MIG_LIST)
    smi.write_text(f'#!/bin/sh\nif [ "$1" = "-L" ]; then cat {tmp_path}/list; else cat {tmp_path}/table; fi\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    gpus = device_probe.all_gpus()
    assert [(g.index, g.name, g.total, [m.uuid for m in g.migs]) for g in gpus] == [
        (0, "NVIDIA A100-SXM4-40GB", 40960 * 2**20,
         ["MIG-b5e8d4a1-0000-5000-8000-00000000000a", "MIG-GPU-5c89852c-d268/2/0"]),
        (1, "NVIDIA A100-SXM4-40GB", 40960 * 2**20, [])]


def test_on_a_mixed_box_workers_number_gpus_as_nvidia_smi_does():
    from engine.server.ray_workers import actor_env

    gpus = device_probe.parse_gpus(MIXED_TABLE)
    env = worker_env("cuda:1", None, {})
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and actor_env({})["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    found = device_probe.probe(env, gpus)
    assert (found["name"], found["vram_total"], found.get("note")) == ("NVIDIA RTX A6000", 49140 * 2**20, None)
    # the user's own order wins, and the probe says what that means for the names it shows
    env = worker_env("cuda:1", None, {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})
    assert env["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
    assert "CUDA_DEVICE_ORDER=FASTEST_FIRST" in device_probe.probe(env, gpus)["note"]


def test_sweep_members_split_into_balanced_groups_and_resume_by_checkpoint_step():
    assert chunk(list("abcde"), 2) == [["a", "b", "c"], ["d", "e"]]
    assert chunk(list("ab"), 5) == [["a"], ["b"]]
    at = lambda step, names: [(n, step) for n in names]  # noqa: E731
    assert placement.plan_groups(at(0, "abcd"), 2) == [["a", "b"], ["c", "d"]]
    assert placement.plan_groups(at(0, "abcd"), 4) == [["a"], ["b"], ["c"], ["d"]]
    assert placement.plan_groups(at(0, "abcd"), 4, smallest_group=2) == [["a", "b"], ["c", "d"]]
    # members left at different steps are never batched together (they share one step counter) ...
    assert placement.plan_groups(at(10, "ab") + at(5, "cd"), 2) == [["a", "b"], ["c", "d"]]
    assert placement.plan_groups(at(10, "abc") + at(5, "d"), 3) == [["a", "b"], ["c"], ["d"]]
    # ... unless there are more steps than workers: the last worker trains the rest, step by step
    assert placement.plan_groups(at(10, "a") + at(5, "b") + at(0, "c"), 2) == [["a"], ["b", "c"]]
    assert placement.plan_groups([], 2) == []


def test_only_a_plain_sweep_with_several_free_workers_is_split(tmp_path):
    (tmp_path / "concepts" / "toy").mkdir(parents=True)
    (tmp_path / "concepts" / "toy" / "concept.toml").write_text('name = "toy"\n')
    params = {"seeds": [1, 2], "inits": ["cat", "dog"]}
    run_dir = jobs.create_run(tmp_path, {"kind": "sweep", "concept": "toy", "params": params})
    first = lambda count: placement.Plan([SweepGroup(i, count, None) for i in range(count)])  # noqa: E731
    assert placement.plan("sweep", params, run_dir, free=2) == first(2)
    assert placement.plan("sweep", params, run_dir, free=8) == first(4)  # one member each
    assert placement.plan("sweep", params, run_dir, free=8, smallest_group=3) == placement.Plan()  # 4 // 3 = 1
    assert placement.plan("sweep", params, run_dir, free=1) == placement.Plan()
    assert placement.plan("experiment", params, run_dir, free=4) == placement.Plan()
    # a resume: the members are known; one is done, the others stand at their checkpoints
    members = [jobs.create_run(tmp_path, {"kind": "train", "concept": "toy", "params": {}}) for _ in range(4)]
    jobs.update_run(run_dir, members=[m.name for m in members])
    jobs.update_run(members[0], status="done")
    (members[0] / "learned_embeds.safetensors").write_bytes(b"")
    for member, step in zip(members[1:], (10, 10, 5)):
        (member / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (member / "checkpoints" / f"step-{step}" / "state.safetensors").write_bytes(b"")
    names = [m.name for m in members]
    assert placement.plan("sweep", params, run_dir, free=3) == placement.Plan(
        [SweepGroup(0, 3, [names[1]]), SweepGroup(1, 3, [names[2]]), SweepGroup(2, 3, [names[3]])])
    assert placement.plan("sweep", params, run_dir, free=2) == placement.Plan(
        [SweepGroup(0, 2, names[1:3]), SweepGroup(1, 2, [names[3]])])


def test_the_smallest_group_setting_is_checked(monkeypatch):
    assert placement.min_group({}) == 1 and placement.min_group({"TISTUDIO_SWEEP_MIN_GROUP": "4"}) == 4
    with pytest.raises(UserError, match="TISTUDIO_SWEEP_MIN_GROUP='0' must be a whole number"):
        placement.min_group({"TISTUDIO_SWEEP_MIN_GROUP": "0"})


# ---------------------------------------------------------------------------
# Two cpu workers, torch-free jobs


def _two_cpu_workers(monkeypatch) -> None:
    monkeypatch.setenv("TISTUDIO_DEVICES", "cpu,cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what the engine gives two CPU workers on 2 cores, made sure
    monkeypatch.setenv("TISTUDIO_EXTRA_HANDLERS", TEST_HANDLERS)
    monkeypatch.delenv("TISTUDIO_SWEEP_MIN_GROUP", raising=False)


@pytest.fixture
def two_cpus(engine_home, monkeypatch):
    """An engine of its own with two cpu workers."""
    _two_cpu_workers(monkeypatch)
    return engine_home


@pytest.fixture
def warm_two_cpus(shared_engine_home, monkeypatch):
    """The module's one engine with two cpu workers, for the training tests that need no engine
    of their own: its workers load the model once, not once per test."""
    _two_cpu_workers(monkeypatch)
    return shared_engine_home


async def _first_step(client: EngineClient, run_id: str) -> None:
    stream = client.events(run_id)
    try:
        async for event in stream:
            if event["type"] == "step":
                return
    finally:
        await stream.aclose()


def _steps(home: Path, run_id: str) -> list[dict]:
    run_dir = jobs.find_run(home, run_id)
    return [e for e in jobs.EventLog(run_dir / "events.jsonl").read() if e["type"] == "step"]


def _interleaved(*runs: list[dict]) -> bool:
    """Whether the runs' step events interleave in wall time: each run has a step between
    two steps of another."""
    timeline = sorted((e["t"], k) for k, steps in enumerate(runs) for e in steps)
    order = [k for _, k in timeline]
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    return switches >= len(runs)


async def test_two_workers_run_two_jobs_at_once_and_status_lists_both(two_cpus):
    client = await EngineClient(two_cpus).connect()
    a = await client.submit("sleep", params={"seconds": 3, "steps": 30})
    b = await client.submit("sleep", params={"seconds": 3, "steps": 30})
    await asyncio.wait_for(asyncio.gather(_first_step(client, a), _first_step(client, b)), 60)
    status = await client.status()
    workers = status["workers"]
    assert [(w["worker"], w["device"], w["backend"], w["state"]) for w in workers] == [
        (0, "cpu", "local", "running"), (1, "cpu", "local", "running")]
    assert {w["job"] for w in workers} == {a, b} and len({w["pid"] for w in workers}) == 2
    assert all(w["memory"].get("rss", 0) > 0 and w["kind"] == "sleep" for w in workers)
    backend = status["backend"]
    assert (backend["kind"], backend["devices"]) == ("local", ["cpu", "cpu"])
    # both forked from one zygote (engine.server.zygote), never asked to import torch for these torch-free jobs
    assert backend["fork"]["zygote"] and not backend["fork"]["preloaded"]
    assert status["running"]["id"] == a and status["worker_pid"] == workers[0]["pid"]  # old clients' fields
    listing = await client.listing()
    assert listing["running_jobs"] == [a, b] and listing["running"] == a
    assert [await client.wait(r) for r in (a, b)] == ["done", "done"]
    assert _interleaved(_steps(two_cpus, a), _steps(two_cpus, b))
    records = [jobs.load_run(jobs.find_run(two_cpus, r)) for r in (a, b)]
    assert [r["device"] for r in records] == ["cpu", "cpu"]
    idle = await client.status()
    assert [w["state"] for w in idle["workers"]] == ["idle", "idle"] and idle["running"] is None
    await client.stop()


async def test_a_job_asking_for_a_device_no_worker_has_is_refused_at_submit(two_cpus):
    client = await EngineClient(two_cpus).connect()
    with pytest.raises(UserError, match=r"no worker of this engine has device 'cuda:1'; its devices: cpu "):
        await client.submit("echo", params={"device": "cuda:1"})
    assert await client.jobs() == []  # nothing half-made
    run_id = await client.submit("echo", params={"device": "cpu"})
    assert await client.wait(run_id) == "done"
    await client.stop()


async def test_kill_9_of_one_worker_interrupts_only_its_job_and_the_other_finishes(two_cpus):
    client = await EngineClient(two_cpus).connect()
    doomed = await client.submit("sleep", params={"seconds": 30, "steps": 300})
    other = await client.submit("sleep", params={"seconds": 4, "steps": 40})
    await asyncio.wait_for(asyncio.gather(_first_step(client, doomed), _first_step(client, other)), 60)
    before = {w["job"]: w["pid"] for w in (await client.status(device=False))["workers"]}
    os.kill(before[doomed], signal.SIGKILL)
    assert await client.wait(doomed) == "interrupted"
    assert "cpu worker died (killed by SIGKILL); resume" in jobs.load_run(jobs.find_run(two_cpus, doomed))["error"]
    survivor = {w["job"]: w["pid"] for w in (await client.status(device=False))["workers"]}
    assert survivor[other] == before[other]  # untouched: same process, still on its job
    assert await client.wait(other) == "done"
    assert jobs.load_run(jobs.find_run(two_cpus, other))["result"]["started_at"] == 0  # never restarted
    # only the dead worker is replaced, by the next job on its slot
    again = [await client.submit("sleep", params={"seconds": 1, "steps": 5}) for _ in range(2)]
    assert [await client.wait(r) for r in again] == ["done", "done"]
    pids = {w["pid"] for w in (await client.status(device=False))["workers"]}
    assert before[other] in pids and before[doomed] not in pids and len(pids) == 2
    await client.stop()


# ---------------------------------------------------------------------------
# Two cpu workers, real training (builtin:tiny)


@contextlib.contextmanager
def _threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _add_concept(home: Path, image_dir: Path, name: str = "toy") -> None:
    """The concept (once: the warm_two_cpus tests share their data directory)."""
    from engine.sd.models import load_tokenizer
    from engine.store.library import Library

    if not (home / "concepts" / name).is_dir():
        Library(home).add(name, image_dir, "cat", tokenizer=load_tokenizer())


_SOLO: dict = {}  # solo runs already trained, by their settings and images: several tests compare with the same


def _solo(model, home: Path, params: dict, where: Path):
    """The run trained alone, in this process, with one thread as each worker has."""
    import hashlib

    from engine.inversion.train import train
    from engine.sd.formats import read_embedding
    from engine.store.library import Library
    from engine.worker.sweeps import train_config_from

    concept = Library(home).get("toy")
    config = train_config_from(dict(params), concept)
    key = (repr(config), tuple(hashlib.sha256(Path(i).read_bytes()).hexdigest() for i in concept.images))
    if key not in _SOLO:
        with _threads(1):
            _SOLO[key] = read_embedding(train(model, config, where, concept.images)).vectors
    return _SOLO[key]


def _embedding(home: Path, run_id: str):
    from engine.sd.formats import read_embedding

    return read_embedding(jobs.load_run(jobs.find_run(home, run_id))["embedding"]).vectors


def test_two_training_runs_side_by_side_each_end_bit_for_bit_at_their_solo_run(warm_two_cpus, tiny_model,
                                                                              image_dir, tmp_path):
    import torch

    _add_concept(warm_two_cpus, image_dir)
    # Both workers up and their models warm first, so that the two runs start together.
    warm = [call("submit", "train", concept="toy", params={**PARAMS, "steps": 1}, home=warm_two_cpus)
            for _ in range(2)]
    assert [call("wait", r, home=warm_two_cpus) for r in warm] == ["done", "done"]
    params = [{**PARAMS, "seed": 1}, {**PARAMS, "seed": 2, "init": "dog"}]
    ids = [call("submit", "train", concept="toy", params=p, home=warm_two_cpus) for p in params]
    assert [call("wait", r, home=warm_two_cpus) for r in ids] == ["done", "done"]
    assert _interleaved(*(_steps(warm_two_cpus, r) for r in ids))  # they really ran at the same time
    records = [jobs.load_run(jobs.find_run(warm_two_cpus, r)) for r in ids]
    assert records[0]["device"] == records[1]["device"] == "cpu"
    for k, (run_id, p) in enumerate(zip(ids, params)):
        solo = _solo(tiny_model, warm_two_cpus, p, tmp_path / f"solo{k}")
        assert torch.equal(_embedding(warm_two_cpus, run_id), solo)


def _sweep_runs(home: Path, sweep_id: str) -> list[dict]:
    members = jobs.load_run(jobs.find_run(home, sweep_id))["members"]
    return [{**jobs.load_run(jobs.find_run(home, m)), "run_dir": str(jobs.find_run(home, m))} for m in members]


def _assert_members_match_their_solo_runs(home: Path, model, runs: list[dict], tmp_path: Path) -> None:
    import torch

    for k, run in enumerate(runs):
        solo = _solo(model, home, {**PARAMS, "seed": run["params"]["seed"], "init": run["params"]["init"]},
                     tmp_path / f"solo{k}")
        torch.testing.assert_close(_embedding(home, run["id"]), solo, rtol=1e-4, atol=1e-5)


def test_a_sweep_of_four_split_over_two_workers_equals_its_solo_runs(warm_two_cpus, tiny_model, image_dir,
                                                                     tmp_path):
    _add_concept(warm_two_cpus, image_dir)
    sweep_id = call("submit", "sweep", concept="toy", params={**PARAMS, "seeds": [1, 2], "inits": ["cat", "dog"]},
                    home=warm_two_cpus)
    assert call("wait", sweep_id, home=warm_two_cpus) == "done"
    runs = _sweep_runs(warm_two_cpus, sweep_id)
    assert len(runs) == 4 and {r["status"] for r in runs} == {"done"}
    # two groups of two (a whole sweep would batch all four), each batched: one UNet call per step
    logs = [jobs.EventLog(Path(r["run_dir"]) / "events.jsonl").read() for r in runs]
    assert [next(e for e in log if e["type"] == "train")["runs"] for log in logs] == [2, 2, 2, 2]
    assert all(r["device"] == "cpu" for r in runs)
    sweep_dir = jobs.find_run(warm_two_cpus, sweep_id)
    record = jobs.load_run(sweep_dir)
    assert record["result"]["members"] == [r["id"] for r in runs]
    assert record["result"]["embeddings"] == [r["embedding"] for r in runs]
    parent = [e["status"] for e in jobs.EventLog(sweep_dir / "events.jsonl").read()
              if e["type"] == "status"]
    assert parent == ["queued", "running", "done"]
    _assert_members_match_their_solo_runs(warm_two_cpus, tiny_model, runs, tmp_path)


def test_a_split_sweep_killed_in_one_group_resumes_only_what_is_left(two_cpus, tiny_model, image_dir, tmp_path,
                                                                    monkeypatch):
    _add_concept(two_cpus, image_dir)
    monkeypatch.setenv("TISTUDIO_FAULTS", "step@12")  # fires once: the first worker to reach step 12 dies
    monkeypatch.setenv("TISTUDIO_FAULTS_STATE", str(tmp_path / "faults"))
    sweep_id = call("submit", "sweep", concept="toy", params={**PARAMS, "seeds": [1, 2], "inits": ["cat", "dog"]},
                    home=two_cpus)
    assert call("wait", sweep_id, home=two_cpus) == "interrupted"
    runs = _sweep_runs(two_cpus, sweep_id)
    # the other group went on to the end
    assert sorted(r["status"] for r in runs) == ["done", "done", "interrupted", "interrupted"]
    finished = {r["id"]: r["finished"] for r in runs if r["status"] == "done"}
    call("submit", resume=sweep_id, home=two_cpus)
    assert call("wait", sweep_id, home=two_cpus) == "done"
    runs = _sweep_runs(two_cpus, sweep_id)
    assert {r["status"] for r in runs} == {"done"}
    assert {r["id"]: r["finished"] for r in runs if r["id"] in finished} == finished  # not trained again
    resumed = [r for r in runs if r["id"] not in finished]
    for run in resumed:  # each picked up at its checkpoint, alone on a worker
        trained = [e for e in jobs.EventLog(Path(run["run_dir"]) / "events.jsonl").read() if e["type"] == "train"]
        assert [(t["step"], t["runs"]) for t in trained] == [(0, 2), (10, 1)]
    _assert_members_match_their_solo_runs(two_cpus, tiny_model, runs, tmp_path)



def test_a_split_sweep_with_a_bad_member_fails_whole_and_leaves_no_run(warm_two_cpus, image_dir):
    _add_concept(warm_two_cpus, image_dir)
    before = [r["id"] for r in jobs.list_runs(warm_two_cpus)]
    sweep_id = call("submit", "sweep", concept="toy", params={**PARAMS, "inits": ["cat", "photosynthesis"]},
                    home=warm_two_cpus)
    assert call("wait", sweep_id, home=warm_two_cpus) == "failed"  # the other group stopped waiting for members
    record = jobs.load_run(jobs.find_run(warm_two_cpus, sweep_id))
    assert "photosynthesis" in record["error"] and not record.get("members")
    assert [r["id"] for r in jobs.list_runs(warm_two_cpus)] == before + [sweep_id]  # no member was made
    workers = call("status", device=False, home=warm_two_cpus)["workers"]
    assert [w["state"] for w in workers] == ["idle", "idle"]  # both took a group, both are free again

# ---------------------------------------------------------------------------
# The CLI: engine start / status, runs


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from tistudio.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_engine_start_and_status_show_the_workers_and_runs_the_device(two_cpus, capsys, monkeypatch):
    import json

    monkeypatch.setenv("TISTUDIO_RAY_ADDRESS", "off")  # whatever the shell says
    code, out, _ = _cli(capsys, "engine", "status")
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert code == 0 and "2 workers on this machine (cpu, cpu)" in lines["workers"]
    assert lines["#0"] == lines["#1"] == "cpu · no process yet (it starts with a job)"
    code, out, _ = _cli(capsys, "engine", "start")
    assert code == 0 and out.startswith("engine: started · pid ") and "(cpu, cpu)" in out
    assert _cli(capsys, "engine", "start")[1].startswith("engine: already running · pid ")
    code, _, err = _cli(capsys, "engine", "start", "--ray", "auto")
    assert code == 2 and "already running" in err and "stop it first" in err and "Traceback" not in err
    run_id = call("submit", "sleep", params={"seconds": 0.5, "steps": 5})
    assert call("wait", run_id) == "done"
    code, out, _ = _cli(capsys, "runs", "--json")
    assert {r["id"]: r for r in json.loads(out)}[run_id]["device"] == "cpu"
    code, out, _ = _cli(capsys, "runs")
    assert code == 0 and "device" in out and "cpu" in out
    code, out, _ = _cli(capsys, "engine", "status")
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert "idle" in lines["#0"] + lines["#1"] and "pid " in lines["#0"] + lines["#1"]
    state = json.loads(_cli(capsys, "engine", "status", "--json")[1])
    assert [w["device"] for w in state["workers"]] == ["cpu", "cpu"]
    call("stop")


def test_the_config_files_cluster_table_points_the_engine_at_ray(engine_home, capsys, monkeypatch):
    import json

    monkeypatch.setenv("TISTUDIO_RAY_ADDRESS", "unset-below")
    monkeypatch.delenv("TISTUDIO_RAY_ADDRESS")  # main() sets it from the file; monkeypatch takes it away after
    config = Path(os.environ["TISTUDIO_CONFIG_DIR"])
    config.mkdir(parents=True, exist_ok=True)
    (config / "config.toml").write_text('[cluster]\nray_address = "10.0.0.1:6379"\n')
    state = json.loads(_cli(capsys, "engine", "status", "--json")[1])
    assert state["engine"] == "not running" and state["backend"] == {"kind": "ray", "address": "10.0.0.1:6379"}
    assert os.environ["TISTUDIO_RAY_ADDRESS"] == "10.0.0.1:6379"  # what an engine started from here inherits


def test_an_engine_that_cannot_start_says_why_in_one_line(engine_home, monkeypatch):
    monkeypatch.setenv("TISTUDIO_DEVICES", "cpu,gpu0")
    monkeypatch.setenv("TISTUDIO_RAY_ADDRESS", "off")
    with pytest.raises(UserError, match=r"^TISTUDIO_DEVICES='cpu,gpu0': 'gpu0' is not a device; give auto"):
        call("ping", home=engine_home)
