"""engine status|stop: the background process that runs jobs.

`engine status` never starts anything: with no engine running it says so and shows what
an engine started now would see (the device, from engine.device_probe, which needs no
torch, and this shell's environment).
"""

from __future__ import annotations

import sys

from tistudio.commands.output import print_json


def add_commands(sub) -> None:
    engine = sub.add_parser("engine", help="the background engine").add_subparsers(dest="action", metavar="ACTION",
                                                                                  required=True)
    p = engine.add_parser("status", help="engine state, device, environment and the running job (starts nothing)")
    p.add_argument("--json", action="store_true", help="print the state as JSON")
    p.set_defaults(func=status)
    p = engine.add_parser("stop", help="stop the engine (refuses while jobs run unless --force)")
    p.add_argument("--force", action="store_true", help="stop even with jobs running (they become interrupted)")
    p.set_defaults(func=stop)


def engine_state() -> dict:
    """The engine's status answer plus "engine": "running", or, with no engine, what one
    started now would see: {"engine": "not running", "home", "device", "environment"}."""
    from engine.client import EngineNotRunning, call

    try:
        return {"engine": "running", **call("status", device=True, start=False)}
    except EngineNotRunning:
        from engine.device_probe import environment, probe
        from tistudio.commands.output import home

        return {"engine": "not running", "home": str(home()), "device": probe(), "environment": environment()}


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
              "TISTUDIO_DEVICE": "TISTUDIO_DEVICE"}.get(device.get("source"), "probed without torch")
    text += f" ({source}{'' if running else '; what a worker started now would use'})"
    for key in ("note", "error"):
        if device.get(key):
            text += f"; {device[key]}"
    return text


def _environment(env: dict) -> str:
    from engine.device_probe import ENVIRONMENT

    shown = [f"{k}={env[k]}" for k in ENVIRONMENT if k in env]
    unset = [k for k in ("CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k not in env]
    shown += [f"{k}={v}" for k, v in env.items() if k.startswith("TISTUDIO_")]
    return "  ".join(shown + ([f"(unset: {', '.join(unset)})"] if unset else [])) or "(nothing set)"


def _job(job: dict | None, worker_pid: int | None) -> str:
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
    from engine.client import EngineNotRunning, call

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
