"""Job kinds for the engine's own tests.  Not shipped: the worker adds them when
$TISTUDIO_EXTRA_HANDLERS names this file (`helpers.TEST_HANDLERS`).  None of them
imports torch, so a test worker starts fast.
"""

from __future__ import annotations

import json
import os
import time

from engine.errors import UserError
from engine.store.paths import atomic_write_json
from engine.worker.context import JobContext


def sleep(ctx: JobContext) -> dict:
    """Tick `steps` times over `seconds`, checkpointing each step so a resume continues.

    params: seconds (1.0), steps (10), check_cancel (True).
    """
    seconds = float(ctx.params.get("seconds", 1.0))
    steps = int(ctx.params.get("steps", 10))
    checkpoint = ctx.run_dir / "checkpoint.json"
    start = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
    ctx.set_progress(step=start, steps=steps)
    for step in range(start + 1, steps + 1):
        if ctx.params.get("check_cancel", True):
            ctx.check_cancel()
        time.sleep(seconds / steps)
        atomic_write_json(checkpoint, {"step": step})  # before the event: a step seen is a step kept
        ctx.emit("step", step=step, loss=1.0 / step)
        ctx.set_progress(step=step)
    return {"steps": steps, "started_at": start}


def echo(ctx: JobContext) -> dict:
    """Log the params back; return them with the worker's pid."""
    ctx.emit("log", message=ctx.params.get("message", "hello"))
    return {"params": ctx.params, "pid": os.getpid(), "resumed": ctx.resumed}


def fail(ctx: JobContext) -> None:
    """params: user (True: a UserError; False: an internal error), message."""
    message = ctx.params.get("message", "this job was told to fail")
    if ctx.params.get("user", True):
        raise UserError(message)
    raise RuntimeError(message)


def crash(ctx: JobContext) -> None:
    """Die without a word after `after` seconds, the way an OOM kill looks."""
    ctx.emit("log", message="about to crash")
    time.sleep(float(ctx.params.get("after", 0.0)))
    os._exit(int(ctx.params.get("code", 1)))


def counter(ctx: JobContext) -> dict:
    """Append 'start <tag>' and 'end <tag>' lines to params['file'] (ordering tests)."""
    path, tag = ctx.params["file"], ctx.params.get("tag", ctx.run_id)
    _append(path, f"start {tag}\n")
    time.sleep(float(ctx.params.get("seconds", 0.0)))
    _append(path, f"end {tag}\n")
    return {"tag": tag}


def burst(ctx: JobContext) -> dict:
    """Emit `count` log events as fast as possible (event-stream tests)."""
    count = int(ctx.params.get("count", 1000))
    for i in range(count):
        ctx.emit("log", i=i)
    return {"count": count}


def warm(ctx: JobContext) -> dict:
    """Count the jobs this worker has run: proves the cache survives between jobs."""
    ctx.cache["warm"] = ctx.cache.get("warm", 0) + 1
    return {"count": ctx.cache["warm"], "pid": os.getpid()}


def load_torch(ctx: JobContext) -> dict:
    """Import torch in the worker, as every real job does (device-probe tests)."""
    import torch

    return {"torch": torch.__version__, "pid": os.getpid()}


def process(ctx: JobContext) -> dict:
    """How this worker was started: its parent, whether torch was imported before the job
    (a worker forked from a preloaded zygote has it), its threads and device (zygote tests)."""
    import sys

    torch = sys.modules.get("torch")
    with open("/proc/self/comm") as comm:
        name = comm.read().strip()
    return {"pid": os.getpid(), "ppid": os.getppid(), "torch_before": torch is not None, "name": name,
            "threads": torch.get_num_threads() if torch else None, "device": os.environ.get("TISTUDIO_DEVICE")}


def gate(ctx: JobContext) -> dict:
    """Hold the worker until params['file'] exists (at most `timeout` seconds): jobs submitted
    meanwhile queue behind it, however fast the box (queueing tests)."""
    deadline = time.monotonic() + float(ctx.params.get("timeout", 120))
    while not os.path.exists(ctx.params["file"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{ctx.params['file']} never appeared")
        time.sleep(0.02)
    return {}


def _append(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


HANDLERS = {
    "sleep": sleep,
    "echo": echo,
    "fail": fail,
    "crash": crash,
    "counter": counter,
    "burst": burst,
    "warm": warm,
    "torch": load_torch,
    "process": process,
    "gate": gate,
}
