"""The worker: the process that runs jobs on one device, one at a time, and keeps models warm.

The engine server has one per device, forked warm by its zygote (engine.server.zygote) or started
as its own child (`python -m engine.worker.main --home DIR`), its device in $TISTUDIO_DEVICE
(engine.devices.pool), and talks to it in JSON lines
(engine.wire.protocol): RunJob, CancelJob and ProbeDevice on its stdin; Hello, Event,
Progress, Finished and DeviceReport on its stdout.  On Ray the same `Worker` runs inside
a Ray actor (engine.server.ray_workers), its messages going through a Ray queue instead.

A handler's failure never ends the worker; a crash (os._exit, a signal, the OOM
killer) does, and the server then marks the job interrupted.  When the server
goes away the worker goes too (stdin EOF, and PR_SET_PDEATHSIG on Linux), so an
orphan never keeps the GPU or writes to a run the next engine will recover.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from engine import faults
from engine.devices import determinism
from engine.errors import JobCancelled, UserError, one_line
from engine.store.events import EventLog, events_path
from engine.store.paths import atomic_write_text, disk_full_message, home_dir, is_disk_full
from engine.store.runs import set_status
from engine.wire import protocol
from engine.worker.context import JobContext

ERROR_LOG = "error.log"


class Worker:
    def __init__(self, home: Path, out, placement: dict | None = None):
        self.home = home
        self._out = out  # the protocol pipe (the original stdout), or anything with write() and flush()
        self._out_lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue()
        self._cancelled: set[str] = set()
        self.cache: dict = {}  # survives between jobs: this is where warm models live
        # Where its jobs run, recorded in their run.json: {"device": "cuda:1"} (and "node" on Ray).
        self.placement = placement if placement is not None else {"device": own_device()}
        determinism.prepare_process()  # before any job starts CUDA, so any job may ask for --deterministic

    # -- talking to the server

    def send(self, msg: protocol.Message) -> None:
        line = protocol.encode(msg)
        try:
            with self._out_lock:
                self._out.write(line)
                self._out.flush()
        except OSError:
            os._exit(3)  # the server is gone; nobody will read what we do next

    def _read_stdin(self) -> None:
        for raw in sys.stdin.buffer:
            try:
                msg = protocol.parse_worker_command(protocol.decode(raw))
            except protocol.ProtocolError:
                continue
            if isinstance(msg, protocol.CancelJob):
                # Set here, not via the inbox: the main thread is busy in the handler.
                self.cancel(msg.run_id)
                continue
            if isinstance(msg, protocol.RunJob):
                self.accept(msg.job.run_id)
            self._inbox.put(msg)
        os._exit(0)  # stdin closed: the server stopped us or died

    def cancel(self, run_id: str) -> None:
        """Ask the job `run_id` to stop (from any thread: its handler polls the flag)."""
        self._cancelled.add(run_id)

    def accept(self, run_id: str) -> None:
        """A new attempt of `run_id` is on its way: a stale cancel of an earlier attempt must
        not cancel it (a cancel sent after the job arrives after it, so it is kept)."""
        self._cancelled.discard(run_id)

    def serve(self) -> None:
        threading.Thread(target=self._read_stdin, name="stdin", daemon=True).start()
        self.send(protocol.Hello(os.getpid()))
        while True:
            msg = self._inbox.get()
            if isinstance(msg, protocol.RunJob):
                self.run_job(msg.job)
            elif isinstance(msg, protocol.ProbeDevice):
                self.send(protocol.DeviceReport(self.device_report()))

    def device_report(self) -> dict | None:
        """device_info(), and what this worker keeps between jobs (`held`: its warm model, a
        compiled UNet), which `engine status` shows."""
        info = device_info()
        if info is None or not self.cache:  # nothing is held before a job has loaded torch
            return info
        from engine.worker.job_kinds import held

        return {**info, "held": held(self.cache)}

    # -- running one job

    def run_job(self, job: protocol.JobSpec) -> protocol.Finished:
        """Run `job` (or its group of a split sweep: only the lead group writes the job's own
        record, and no group its final status, which the server writes once all have ended)."""
        run_id, run_dir, group = job.run_id, Path(job.run_dir), job.group
        lead = group is None or group.index == 0
        _reset_peak_memory(self.placement.get("device"))  # the job's own vram_peak
        log = EventLog(events_path(run_dir))
        ctx = JobContext(
            spec={"kind": job.kind, "concept": job.concept, "params": job.params, "run_id": run_id,
                  "group": group.to_wire() if group else None},
            run_id=run_id,
            run_dir=run_dir,
            home=self.home,
            cache=self.cache,
            resumed=job.resumed,
            send=self.send,
            is_cancelled=lambda: run_id in self._cancelled,
            log=log,
            placement=dict(self.placement),
            writes_job=lead,
        )
        refused = None
        if lead:
            refused = self._status(ctx, "running", pid=os.getpid(), started=time.time(), attempts=job.attempts + 1,
                                   **self.placement)
        if refused is None:
            status, error, result = self._call_handler(ctx)
        else:  # a job whose start cannot even be recorded would write nothing else either
            status, error, result = "failed", refused, None
        try:
            ctx.flush()
        except OSError:
            pass
        if group is None:
            refused = self._status(ctx, status, error=error, result=result)
        finished = protocol.Finished(run_id, status, error, unsaved=refused)
        self.send(finished)
        log.close()
        if status == "failed":
            _free_memory()
        return finished

    def _call_handler(self, ctx: JobContext) -> tuple[str, str | None, dict | None]:
        try:
            result = load_handler(ctx.spec["kind"])(ctx)
            return "done", None, _plain(result)
        except JobCancelled:
            return "cancelled", None, None
        except UserError as exc:
            return "failed", one_line(str(exc), 300), None
        except Exception as exc:  # noqa: BLE001 - a bug or an OOM: report it, keep the worker
            if is_disk_full(exc):  # any job kind, any write: one message that says what to do
                return "failed", disk_full_message(ctx.home, f"`tistudio resume {ctx.run_id}`"), None
            return self._crashed(ctx, exc)

    def _crashed(self, ctx: JobContext, exc: Exception) -> tuple[str, str, None]:
        try:
            atomic_write_text(ctx.run_dir / ERROR_LOG, traceback.format_exc())
            where = f" (traceback in {ERROR_LOG})"
        except OSError:
            where = ""
        return "failed", one_line(f"{type(exc).__name__}: {exc}", 300) + where, None

    def _status(self, ctx: JobContext, status: str, **fields) -> str | None:
        """Record a status change (log, run.json) and tell the server; returns None, or why
        the disk refused it (a full disk refuses every write: the server then holds it)."""
        with ctx.emit_lock:  # in seq order with the handler's own events
            try:
                event = set_status(ctx.run_dir, status, log=ctx.log, **fields)
            except OSError as exc:
                if is_disk_full(exc):
                    return disk_full_message(ctx.home, f"`tistudio resume {ctx.run_id}`")
                return one_line(f"could not record the run's status: {type(exc).__name__}: {exc}", 300)
            self.send(protocol.Event(ctx.run_id, event))
            return None


EXTRA_HANDLERS_ENV = "TISTUDIO_EXTRA_HANDLERS"


def load_handler(kind: str):
    """engine.worker.job_kinds.HANDLERS[kind], or a kind from the Python file $TISTUDIO_EXTRA_HANDLERS
    names (its own HANDLERS dict; the engine's tests add theirs this way).  Imported on
    first use, so a worker that runs only torch-free kinds never pays for torch."""
    extra = os.environ.get(EXTRA_HANDLERS_ENV)
    if extra:
        handlers = _handlers_from_file(extra)
        if kind in handlers:
            return handlers[kind]
    try:
        from engine.worker.job_kinds import HANDLERS
    except ModuleNotFoundError as exc:
        if exc.name != "engine.worker.job_kinds":
            raise
        HANDLERS = {}
    if kind not in HANDLERS:
        known = ", ".join(sorted(HANDLERS)) or "none"
        raise UserError(f"unknown job kind {kind!r} (known: {known})")
    return HANDLERS[kind]


@functools.cache
def _handlers_from_file(path: str) -> dict:
    spec = importlib.util.spec_from_file_location("tistudio_extra_handlers", path)
    if spec is None or not Path(path).is_file():
        raise UserError(f"${EXTRA_HANDLERS_ENV} names {path!r}, which is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HANDLERS


def device_info() -> dict | None:
    """What torch sees of the accelerator, or None when no job has loaded torch yet: a probe
    must not cost a torch import (the server then asks engine.devices.probe instead)."""
    if "torch" not in sys.modules:
        return None
    try:
        from engine.devices.runtime import device_info as gpu_device_info

        return gpu_device_info()
    except UserError as exc:
        return {"device": "unavailable", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - no torch, a broken driver: still answer
        return {"device": "cpu", "error": one_line(f"{type(exc).__name__}: {exc}", 300)}


def own_device() -> str:
    """The device this worker was given ($TISTUDIO_DEVICE, engine.devices.pool), else the one a
    worker would pick, found without torch."""
    from engine.devices.probe import probe

    return os.environ.get("TISTUDIO_DEVICE") or probe().get("device", "cpu")


def _reset_peak_memory(device: str | None) -> None:
    """The allocator's peak, counted from this job's start (engine.devices.runtime.reset_peak_memory).
    Only once a job has loaded torch: before that there is no peak, and this worker stays torch-free."""
    if device and "torch" in sys.modules:
        from engine.devices.runtime import reset_peak_memory

        reset_peak_memory(device)


def _free_memory() -> None:
    # After a failure the handler's tensors are garbage; give their VRAM back now.
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _plain(result) -> dict | None:
    if result is None:
        return None
    if not isinstance(result, dict):
        result = {"value": result}
    return json.loads(json.dumps(result, default=str))


def _claim_stdout():
    """Keep the real stdout for the protocol and point fd 1 at stderr, so a stray
    print() in a handler or a library cannot corrupt the message stream."""
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    expected = os.environ.get("TISTUDIO_ENGINE_PID")
    if expected and os.getppid() != int(expected):
        os._exit(0)  # the server died before we could ask to die with it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.worker.main")
    parser.add_argument("--home", required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop
    out = _claim_stdout()
    faults.arm()  # crash tests inject faults into job work, never into the server
    Worker(home_dir(args.home), out).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
