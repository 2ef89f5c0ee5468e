"""engine start|status|stop: the background process that runs jobs.

`engine status` never starts anything: with no engine running it says so and shows what
an engine started now would see (the devices, from engine.devices.pool and engine.devices.probe,
which need no torch, and this shell's environment).  `engine start` starts one now, on
this machine's devices or (--ray, or `[cluster] ray_address` in the config file) on a Ray
cluster; any other command starts one on demand the same way.
"""

from __future__ import annotations

import sys

from tistudio.commands.output import print_json


def add_commands(sub) -> None:
    engine = sub.add_parser("engine", help="the background engine").add_subparsers(dest="action", metavar="ACTION",
                                                                                  required=True)
    p = engine.add_parser("start", help="start the engine now (on a Ray cluster with --ray)")
    p.add_argument("--ray", metavar="auto|ADDRESS",
                   help="run jobs on a Ray cluster: auto (the one this machine is part of) or its address, "
                        "e.g. 10.0.0.1:6379; off: on this machine (else $TISTUDIO_RAY_ADDRESS, the config "
                        "file's [cluster] ray_address)")
    p.set_defaults(func=start)
    p = engine.add_parser("status", help="engine state, workers, environment and the running jobs (starts nothing)")
    p.add_argument("--json", action="store_true", help="print the state as JSON")
    p.set_defaults(func=status)
    p = engine.add_parser("stop", help="stop the engine (refuses while jobs run unless --force)")
    p.add_argument("--force", action="store_true", help="stop even with jobs running (they become interrupted)")
    p.set_defaults(func=stop)


def engine_state() -> dict:
    """The engine's status answer plus "engine": "running", or, with no engine, what one
    started now would see: {"engine": "not running", "home", "device", "environment"}."""
    from engine.wire.client import EngineNotRunning, call

    try:
        return {"engine": "running", **call("status", device=True, start=False)}
    except EngineNotRunning:
        from engine.devices.probe import environment, probe
        from tistudio.commands.output import home

        return {"engine": "not running", "home": str(home()), "device": probe(), "environment": environment(),
                **_would_start()}


def _would_start() -> dict:
    """The backend and workers an engine started now would have (or why it would refuse)."""
    from engine.devices.pool import engine_devices, ray_address
    from engine.errors import UserError

    address = ray_address()
    if address:
        return {"backend": {"kind": "ray", "address": address}, "workers": []}
    try:
        found = engine_devices()
    except UserError as exc:
        return {"backend": {"kind": "local", "error": str(exc)}, "workers": []}
    return {"backend": {"kind": "local", "devices": found},
            "workers": [{"worker": i, "device": d, "backend": "local", "state": "none", "memory": {}}
                        for i, d in enumerate(found)]}


def start(args) -> int:
    """Start the engine (or say that one runs, and how); --ray sets where its jobs run."""
    import os

    from engine.devices.pool import RAY_ADDRESS_ENV, ray_address
    from engine.errors import UserError
    from engine.wire.client import EngineNotRunning, call

    try:
        state = call("status", device=False, start=False)
    except EngineNotRunning:
        state = None
    if state is not None:
        wanted = None if args.ray is None else ray_address(args.ray) is not None
        running = state.get("backend") or {"kind": "local"}
        if wanted is not None and wanted != (running.get("kind") == "ray"):
            raise UserError(f"an engine is already running for {state.get('home')} ({_backend(running)}); "
                            "stop it first with `tistudio engine stop`, then start it again")
        print(f"engine: already running · pid {state['pid']} · {_backend(running)}")
        return 0
    if args.ray is not None:
        os.environ[RAY_ADDRESS_ENV] = args.ray  # the engine started below inherits it (off: this machine)
    state = call("status", device=False, start=True)
    print(f"engine: started · pid {state['pid']} · {_backend(state.get('backend') or {})}")
    return 0


def _backend(backend: dict) -> str:
    """Where the engine runs its jobs, for people."""
    if backend.get("kind") == "ray":
        workers = backend.get("workers")
        return f"on the Ray cluster at {backend.get('address')}" + (
            f" ({_plural(workers, 'worker')}, one per GPU)" if workers is not None else "")
    if backend.get("error"):
        return f"would refuse to start: {backend['error']}"
    found = backend.get("devices") or []
    where = f"{_plural(len(found), 'worker')} on this machine ({', '.join(found)})" if found else "on this machine"
    fork = backend.get("fork") or {}
    if fork.get("off"):
        return f"{where}; each starts on its own ({fork['off']})"
    if fork.get("zygote"):
        warm = "" if fork.get("preloaded") else " (torch not preloaded yet)"
        return f"{where}; forked warm from zygote {fork['zygote']}{warm}"
    return where


def status(args) -> int:
    state = engine_state()
    if args.json:
        print_json(state)
    else:
        print("\n".join(describe(state)))
    return 0


def describe(state: dict) -> list[str]:
    """`engine status` for people: one labelled line per thing."""
    from tistudio.formatting import fmt_duration  # the studio's formatters, shared

    running = state["engine"] == "running"
    if running:
        head = (f"running · pid {state['pid']} · up {fmt_duration(state.get('uptime', 0))} · "
                f"{_plural(state.get('clients', 0), 'client')} · home {state.get('home')}")
    else:
        head = f"not running (it starts on demand) · home {state.get('home')}"
    lines = [("engine", head), ("device", _device(state.get("device") or {}, running))]
    backend = state.get("backend") or {}
    if backend:
        lines.append(("workers", _backend(backend) if running else f"an engine started now: {_backend(backend)}"))
    lines += [(f"#{w.get('worker', i)}", _worker(w)) for i, w in enumerate(state.get("workers") or [])]
    lines.append(("env", _environment(state.get("environment") or {})))
    if running:
        lines.append(("job", _job(state.get("running"), state.get("worker_pid"))))
        queued = state.get("queued") or []
        lines.append(("queue", f"{len(queued)} waiting" + (f": {', '.join(queued)}" if queued else "")))
        lines.append(("storage", _storage(state.get("storage") or {})))
    return [f"{label:8} {text}" for label, text in lines]


def _device(device: dict, running: bool) -> str:
    from tistudio.formatting import fmt_bytes

    text = device.get("device", "unknown")
    if device.get("name"):
        text += f" · {device['name']}"
    if device.get("vram_total"):
        used = device.get("vram_used_device")
        text += f" · {fmt_bytes(device['vram_total'])}" + (f", {fmt_bytes(used)} in use" if used is not None else "")
    if device.get("vram_allocated") is not None:
        text += (f" · worker: {fmt_bytes(device['vram_allocated'])} allocated, "
                 f"{fmt_bytes(device.get('vram_reserved'))} reserved")
    if device.get("torch"):
        text += f" · torch {device['torch']}"
    source = {"worker": "the worker's torch", "nvidia-smi": "nvidia-smi", "driver": "the NVIDIA driver",
              "TISTUDIO_DEVICE": "TISTUDIO_DEVICE", "engine": "given by the engine",
              "ray": "the Ray actor"}.get(device.get("source"), "probed without torch")
    text += f" ({source}{'' if running else '; what a worker started now would use'})"
    for key in ("note", "error"):
        if device.get(key):
            text += f"; {device[key]}"
    return text


def _worker(worker: dict) -> str:
    """One worker for people: device, what it does, how fast, its memory."""
    from tistudio.formatting import fmt_bytes

    where = worker.get("device") or "?"
    if worker.get("node"):
        where += f" @ {worker['node']}"
    if worker.get("name"):
        where += f" · {worker['name']}"
    state = worker.get("state") or "none"
    parts = [where]
    if worker.get("job"):
        what = f"{state} {worker['job']} · {worker.get('kind')}"
        if worker.get("concept"):
            what += f" {worker['concept']}"
        if worker.get("members"):
            what += f" · {_plural(len(worker['members']), 'member')}"
        parts.append(what)
        if worker.get("steps"):
            parts.append(f"step {worker.get('step') or 0}/{worker['steps']}")
        if worker.get("steps_per_s"):
            parts.append(f"{worker['steps_per_s']:.2f} steps/s")
    else:
        parts.append({"none": "no process yet (it starts with a job)"}.get(state, state))
    memory = worker.get("memory") or {}
    if memory.get("vram_allocated") is not None:
        parts.append(f"VRAM {fmt_bytes(memory['vram_allocated'])} allocated, "
                     f"{fmt_bytes(memory.get('vram_reserved'))} reserved")
    if memory.get("vram_total"):
        used = memory.get("vram_used_device")
        parts.append(f"device {fmt_bytes(used)} of {fmt_bytes(memory['vram_total'])} in use" if used is not None
                     else f"device {fmt_bytes(memory['vram_total'])}")
    if memory.get("rss"):
        parts.append(f"RSS {fmt_bytes(memory['rss'])}")
    if worker.get("held"):
        parts.append(_held(worker["held"]))
    if worker.get("pid"):
        parts.append(f"pid {worker['pid']}")
    return " · ".join(parts)


def _held(held: dict) -> str:
    """What an idle worker keeps between jobs: its warm model, and a compiled UNet with what it was compiled for."""
    text = f"holds {held.get('model')} ({held.get('dtype')})" if held.get("model") else "holds nothing"
    compiled = held.get("compiled_unet")
    if compiled:
        text += (f" + compiled UNet ({compiled.get('mode')}, batch {compiled.get('batch')}, "
                 f"{compiled.get('resolution')} px{', low VRAM' if compiled.get('low_vram') else ''})")
    return text


def _environment(env: dict) -> str:
    from engine.devices.probe import ENVIRONMENT

    shown = [f"{k}={env[k]}" for k in ENVIRONMENT if k in env]
    unset = [k for k in ("CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k not in env]
    shown += [f"{k}={v}" for k, v in env.items() if k.startswith("TISTUDIO_")]
    return "  ".join(shown + ([f"(unset: {', '.join(unset)})"] if unset else [])) or "(nothing set)"


def _job(job: dict | None, worker_pid: int | None) -> str:
    """The first running job (the workers' lines show every one)."""
    worker = f"worker pid {worker_pid}" if worker_pid else "no worker (it starts with the next job)"
    if not job:
        return f"none · {worker}"
    steps = f" · step {job.get('step') or 0}/{job['steps']}" if job.get("steps") else ""
    concept = f" {job['concept']}" if job.get("concept") else ""
    return f"{job['id']} · {job.get('kind')}{concept} · {job.get('status')}{steps} · {worker}"


def _storage(storage: dict) -> str:
    if storage.get("writable", True):
        return "writable"
    held = storage.get("unsaved") or []
    text = f"cannot write: {storage.get('error')}"
    if held:
        text += f"; holding {_plural(len(held), 'run status', 'run statuses')} in memory ({', '.join(held)})"
    return text


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def stop(args) -> int:
    from engine.wire.client import EngineNotRunning, call

    try:
        call("stop", force=args.force, start=False)
    except EngineNotRunning:
        print("engine: not running")
        return 0
    print("engine: stopped")
    return 0


def warn_if_not_writable(storage: dict) -> None:
    """One line on stderr when the engine cannot write to its home (the commands that list runs)."""
    if storage and not storage.get("writable", True):
        print(f"tistudio: warning: the engine cannot write to its home: {storage.get('error')}; "
              "statuses it holds in memory are shown", file=sys.stderr)
