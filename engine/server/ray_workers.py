"""Jobs on a Ray cluster: one Ray actor per GPU, each running the engine's own worker code.

    engine.server.main ── Scheduler ──▶ RaySupervisor (slot i) ──run/cancel/probe──▶ WorkerActor (num_gpus=1)
                                        ▲                                      engine.worker.main.Worker
                                        └──────── a Ray queue per actor ◀───── protocol messages

Only with `--ray auto|ADDRESS` ($TISTUDIO_RAY_ADDRESS, the config file's [cluster]
ray_address) and the `cluster` extra installed; nothing else imports Ray (the studio and
the plain CLI never do), and this module imports it only when it is used.

* Workers.  One actor per GPU the cluster has when the engine starts, each asking Ray for
  `num_gpus=1` (Ray sets the actor's CUDA_VISIBLE_DEVICES, so inside it the GPU is
  cuda:0).  An actor hosts an `engine.worker.main.Worker`: the same job handlers, the same run
  records, models kept warm in the actor between jobs.  It is created with the first job
  of its slot and lives until the engine stops.
* Messages.  The worker's protocol messages (Event, Progress, Finished …) go through a
  `ray.util.queue.Queue` pinned to the engine's node, one per actor, in order; the
  scheduler hears them exactly as it hears a local worker's stdout.  The event log on the
  shared data directory stays the source of truth: `attach` and late subscribers replay it.
* Shared storage.  Run directories, checkpoints and logs are written by the actors
  straight into the data directory, so it must be the same storage at the same path on
  every node.  At start the engine sends a task to every GPU node that writes a probe file
  there and reads each back; a node whose file does not appear makes it refuse to start.
* Recovery.  Actors restart when their process or node dies (max_restarts=-1) and a job
  they were running is retried (max_task_retries=RETRIES): the retry marks the run
  resumed and training continues from its last checkpoint on the shared storage, bit for
  bit.  With the retries spent the job ends `interrupted`, as a local worker's death does.
* Cancel.  The actor takes calls concurrently (max_concurrency), so a cancel reaches the
  running job at once; one that ignores it is killed after the grace (ray.kill without
  restart) and the slot gets a fresh actor.

The head node (its GCS, and this engine on it) is a single point of failure: if it goes,
the actors go with their owner, and the next engine marks their runs interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
from pathlib import Path

from engine.devices import probe as device_probe
from engine.errors import UserError, one_line
from engine.server.supervisor import START_TIMEOUT, WorkerStartError
from engine.wire import protocol
from engine.wire.protocol import engine_dir

RETRIES = 3  # times Ray runs a job again after its actor died, before the job ends interrupted
PROBE_TIMEOUT = 5.0
STORAGE_TIMEOUT = 120.0  # seconds for every node's storage probe (a node may start a worker process first)
GRACE_AFTER_DEATH = 0.5  # seconds to let the queue deliver what a dead actor said last
# The engine's variables the actors get (their device is Ray's to give, their home is the engine's).
NOT_PASSED = ("TISTUDIO_DEVICE", "TISTUDIO_DEVICES", "TISTUDIO_ENGINE_PID", "TISTUDIO_RAY_ADDRESS")

log = logging.getLogger("tistudio.engine")


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("running jobs on Ray needs the cluster extra: pip install 'tistudio[cluster]' "
                        "(or start the engine without --ray)") from None
    return ray


def actor_env(env=os.environ) -> dict[str, str]:
    """The variables every actor and probe task runs with: the engine's TISTUDIO_* and the
    ones that change what a worker does (engine.devices.probe.ENVIRONMENT), but the device."""
    passed = {k: v for k, v in device_probe.environment(env).items()
              if k not in NOT_PASSED and k != "CUDA_VISIBLE_DEVICES"}
    return {device_probe.ORDER_ENV: device_probe.BUS_ORDER, **passed}  # CUDA numbers GPUs as nvidia-smi does


class RayWorkers:
    """The Ray pool: joins the cluster, checks the shared storage, one supervisor per GPU."""

    kind = "ray"

    def __init__(self, home: os.PathLike | str, address: str):
        self.home = Path(home)
        self.address = address
        self.count = 0
        self.node_id: str | None = None  # the engine's own node, where the message queues live

    async def start(self) -> None:
        await asyncio.to_thread(self._connect)

    def _connect(self) -> None:
        ray = _ray()
        try:
            ray.init(address=self.address, namespace="tistudio", log_to_driver=True,
                     runtime_env={"env_vars": actor_env()})
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if "auth" in _causes(exc).lower():
                raise UserError(f"the Ray cluster at {self.address!r} refused the engine's token: give the "
                                "engine's environment what Ray's token authentication asks for (RAY_AUTH_MODE=token "
                                "and the cluster's token; see Ray's docs, ray-security/token-auth)") from None
            raise UserError(f"could not join the Ray cluster at {self.address!r} ({one_line(exc, 200)}); "
                            "start it with `ray start --head` (or give its address: --ray HOST:6379)") from None
        self.node_id = ray.get_runtime_context().get_node_id()
        self.count = int(ray.cluster_resources().get("GPU", 0))
        if self.count < 1:
            ray.shutdown()
            raise UserError(f"the Ray cluster at {self.address!r} has no GPUs for the workers; start its nodes "
                            "with their GPUs (a CPU-only test cluster can declare logical ones: "
                            "`ray start --head --num-gpus=2`)")
        try:
            check_shared_storage(self.home, gpu_nodes())
        except BaseException:
            ray.shutdown()
            raise
        log.info("joined the Ray cluster at %s: %d GPU worker(s); the data directory is shared", self.address,
                 self.count)

    async def close(self) -> None:
        ray = _ray()
        await asyncio.to_thread(ray.shutdown)

    def supervisors(self, on_message, on_exit) -> list[RaySupervisor]:
        return [RaySupervisor(self, functools.partial(on_message, i), functools.partial(on_exit, i))
                for i in range(self.count)]

    def check_device(self, requested: str | None) -> None:
        if requested and requested != "cuda":
            raise UserError(f"this engine runs jobs on a Ray cluster, where each worker has the one GPU Ray "
                            f"gives it; drop --device {requested} (or give cuda)")

    async def gpus(self) -> list | None:
        return None

    def describe(self) -> dict:
        return {"kind": self.kind, "address": self.address, "workers": self.count}


def _causes(exc: BaseException) -> str:
    """An exception and those it was raised from, as one text."""
    parts = []
    while exc is not None and len(parts) < 10:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " / ".join(parts)


def gpu_nodes() -> list[dict]:
    """The cluster's live nodes that have GPUs (where workers may run)."""
    ray = _ray()
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]


def check_shared_storage(home: Path, nodes: list[dict], task_dir: Path | None = None) -> None:
    """A task on each node writes a probe file into the data directory; the engine reads each
    back.  UserError naming the nodes whose file did not appear here.  (`task_dir`: where the
    tasks write, the data directory's probe folder unless a test says otherwise.)"""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = engine_dir(home) / "shared-check"
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    write = ray.remote(_write_probe)
    refs = [(node, write.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote(str(task_dir or folder), f"{token}-{node['NodeID'][:16]}", token))
        for node in nodes]
    problems = []
    for node, ref in refs:
        where = node.get("NodeManagerAddress") or node["NodeID"][:16]
        path = folder / f"{token}-{node['NodeID'][:16]}"
        try:
            ray.get(ref, timeout=STORAGE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - any failure there is the node's answer
            problems.append(f"node {where} could not write there ({one_line(exc, 160)})")
            continue
        try:
            seen = path.read_text()
        except OSError:
            seen = None
        if seen != token:
            problems.append(f"node {where} wrote its probe file, but it did not appear here")
        with contextlib.suppress(OSError):
            path.unlink()
    if problems:
        raise UserError(f"the data directory {home} is not shared storage: {'; '.join(problems)}; put it on "
                        "storage every node mounts at the same path (NFS …) and set TISTUDIO_HOME to it, "
                        "or start the engine without --ray")


def _write_probe(folder: str, name: str, token: str) -> str:
    """Runs on a node: write `token` to folder/name (atomically), say where it ran."""
    path = Path(folder) / name
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(token)
    os.replace(tmp, path)
    return socket.gethostname()


# ---------------------------------------------------------------------------
# One slot: its actor, its queue, and the tasks that wait on them


class RayWorker:
    """A live actor (across Ray's restarts of its process): what the scheduler knows as a worker."""

    def __init__(self, actor, queue, pid: int, node: str | None):
        self.actor = actor
        self.queue = queue
        self.pid = pid
        self.node = node
        self.death: str | None = None  # why it is gone for good, in words (engine.server.scheduler says it)
        self.reader: asyncio.Task | None = None

    def kill(self) -> None:
        """Kill the actor for good (a cancel ignored past its grace, the engine stopping)."""
        ray = _ray()
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)


class RaySupervisor:
    """The Ray twin of engine.server.supervisor.WorkerSupervisor: the same methods the scheduler calls."""

    backend = "ray"

    def __init__(self, pool: RayWorkers, on_message, on_exit):
        self.pool = pool
        self.device = "cuda"  # what Ray gives it; the actor says how torch names it once it runs
        self.node: str | None = None
        self.worker: RayWorker | None = None
        self.in_flight: str | None = None
        self.last_device: dict | None = None
        self._on_message = on_message
        self._on_exit = on_exit
        self._starting = asyncio.Lock()
        self._waiters: set[asyncio.Task] = set()

    @property
    def pid(self) -> int | None:
        return self.worker.pid if self.worker else None

    def fits(self, requested: str | None) -> bool:
        return not requested or requested == "cuda"

    async def ensure(self, warm: bool = False) -> RayWorker:  # a Ray actor imports on its own
        async with self._starting:
            if self.worker is None:
                self.worker = await self._spawn()
                self.worker.reader = asyncio.create_task(self._read(self.worker))
                log.info("Ray worker %d started on %s (%s)", self.worker.pid, self.node, self.device)
            return self.worker

    async def _spawn(self) -> RayWorker:
        ray = _ray()
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
            self.pool.node_id, soft=False)})
        actor = _actor_class().options(num_gpus=1, max_restarts=-1, max_task_retries=RETRIES,
                                       max_concurrency=4).remote(str(self.pool.home), queue)
        try:
            hello = await asyncio.wait_for(actor.hello.remote(), START_TIMEOUT)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - no GPU free, a broken node …
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            with contextlib.suppress(Exception):
                queue.shutdown(force=True)
            why = "it did not start in time: is a GPU free? (`ray status`)" if isinstance(
                exc, asyncio.TimeoutError) else one_line(exc, 200)
            raise WorkerStartError(f"Ray actor: {why}") from None
        self.node, self.device = hello.get("node"), hello.get("device") or self.device
        return RayWorker(actor, queue, hello["pid"], self.node)

    async def start_job(self, job: protocol.JobSpec) -> RayWorker:
        worker = await self.ensure()
        self.in_flight = job.run_id
        await worker.actor.accept.remote(job.run_id)  # a stale cancel must not stop this attempt
        ref = worker.actor.run.remote(job.to_wire())
        waiter = asyncio.create_task(self._wait(worker, ref))
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)
        return worker

    async def _wait(self, worker: RayWorker, ref) -> None:
        """The job's call returns when it is over (its Finished came through the queue), or fails
        when the actor is gone for good (Ray's retries spent, or we killed it)."""
        try:
            await ref
        except Exception as exc:  # noqa: BLE001 - RayActorError and kin: the actor is gone
            worker.death = f"its Ray actor is gone ({one_line(exc, 160)})"
            await asyncio.sleep(GRACE_AFTER_DEATH)
            self._exited(worker)

    async def cancel(self, run_id: str) -> None:
        if self.worker:
            with contextlib.suppress(Exception):
                await self.worker.actor.cancel.remote(run_id)

    async def stop(self) -> None:
        worker = self.worker
        if worker is None:
            return
        worker.kill()
        worker.death = "the engine stopped"
        self._exited(worker)

    def kill(self) -> None:
        if self.worker:
            self.worker.kill()

    async def probe_device(self, gpus: list | None = None) -> dict:
        if self.worker is None:
            return {"device": self.device, "source": "ray", "note": "its Ray actor starts with its first job"}
        try:
            found = await asyncio.wait_for(self.worker.actor.probe.remote(), PROBE_TIMEOUT)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - restarting, or a slow node: say what we knew
            return self.last_device or {"device": self.device, "source": "ray"}
        self.last_device = {**found, "source": "ray"}
        return self.last_device

    def memory(self) -> dict:
        rss = (self.last_device or {}).get("rss")
        return {"rss": rss} if rss else {}

    # -- the queue

    async def _read(self, worker: RayWorker) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                line = await worker.queue.get_async(block=True, timeout=1.0)
            except Empty:
                continue
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the queue's actor is gone: so is the worker
                return
            try:
                msg = protocol.parse_worker_message(protocol.decode(line))
            except protocol.ProtocolError:
                log.warning("Ray worker %d said something unreadable: %r", worker.pid, str(line)[:200])
                continue
            try:
                self._heard(worker, msg)
            except Exception:
                log.exception("could not handle Ray worker message %r", msg)

    def _heard(self, worker: RayWorker, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Hello):
            if msg.pid != worker.pid:
                log.warning("Ray restarted worker %d as %d", worker.pid, msg.pid)
                worker.pid = msg.pid
            return
        if isinstance(msg, protocol.Finished) and msg.run_id == self.in_flight:
            self.in_flight = None
        self._on_message(worker, msg)

    def _exited(self, worker: RayWorker) -> None:
        if self.worker is not worker:
            return
        self.worker = None
        run_id, self.in_flight = self.in_flight, None
        if worker.reader:
            worker.reader.cancel()
        with contextlib.suppress(Exception):
            # force: a graceful shutdown blocks this event loop (every client) while the queue
            # actor finishes the reader's pending get, a second or more; nobody reads it now
            worker.queue.shutdown(force=True)
        log.info("Ray worker %d is gone: %s", worker.pid, worker.death)
        try:
            self._on_exit(worker, None, run_id)
        except Exception:
            log.exception("could not handle the end of Ray worker %d", worker.pid)


# ---------------------------------------------------------------------------
# The actor (made on first use, so that importing this module needs no Ray)


class _QueueOut:
    """What engine.worker.main.Worker writes its protocol lines to: the actor's Ray queue."""

    def __init__(self, queue):
        self.queue = queue

    def write(self, line: bytes) -> None:
        try:
            self.queue.put(line.decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - the engine is gone: the worker exits on OSError
            raise OSError(f"the engine's queue is gone: {exc}") from None

    def flush(self) -> None:
        pass


@functools.cache
def _actor_class():
    ray = _ray()

    @ray.remote
    class WorkerActor:
        """engine.worker.main.Worker in a Ray actor: run (retried by Ray after a crash), cancel, probe."""

        def __init__(self, home: str, queue):
            from engine import faults
            from engine.worker.main import Worker, own_device

            faults.arm()  # the crash tests inject faults into job work here as in a local worker
            self.home = Path(home)
            node = ray.util.get_node_ip_address()
            self.worker = Worker(self.home, _QueueOut(queue), placement={"device": own_device(), "node": node})
            self.worker.send(protocol.Hello(os.getpid()))

        def hello(self) -> dict:
            return {"pid": os.getpid(), **self.worker.placement}

        def accept(self, run_id: str) -> None:
            self.worker.accept(run_id)

        def cancel(self, run_id: str) -> None:
            self.worker.cancel(run_id)

        def probe(self) -> dict:
            found = self.worker.device_report() or device_probe.probe()
            with contextlib.suppress(OSError, ValueError, IndexError):
                pages = int(Path("/proc/self/statm").read_text().split()[1])
                found["rss"] = pages * os.sysconf("SC_PAGE_SIZE")
            return {**found, "device": found.get("device") or self.worker.placement["device"]}

        def run(self, job: dict) -> dict:
            spec = _retried(protocol.JobSpec.from_wire(job), self.worker)
            return self.worker.run_job(spec).to_wire()

    return WorkerActor


def _retried(spec: protocol.JobSpec, worker) -> protocol.JobSpec:
    """The job as this attempt should run it: when run.json says an earlier process was running
    it (Ray retries the call after the actor died), it resumes from its checkpoints."""
    import dataclasses

    from engine.store.runs import load_run

    try:
        record = load_run(spec.run_dir)
    except (OSError, ValueError):
        return spec
    if record.get("status") != "running" or record.get("pid") in (None, os.getpid()):
        return spec
    if spec.group is None or spec.group.index == 0:
        worker.send(protocol.Event(spec.run_id, _note(spec, "its worker died; Ray runs it again (it resumes from "
                                                            "its last checkpoint)")))
    return dataclasses.replace(spec, resumed=True, attempts=int(record.get("attempts") or spec.attempts))


def _note(spec: protocol.JobSpec, message: str) -> dict:
    from engine.store.events import EventLog, events_path

    log_file = EventLog(events_path(spec.run_dir))
    try:
        return log_file.append({"type": "log", "message": message})
    finally:
        log_file.close()
