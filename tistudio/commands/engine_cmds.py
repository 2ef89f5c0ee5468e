"""engine status|stop: the background process that runs jobs."""

from __future__ import annotations

from tistudio.commands.output import print_json


def add_commands(sub) -> None:
    engine = sub.add_parser("engine", help="the background engine").add_subparsers(dest="action", metavar="ACTION",
                                                                                  required=True)
    p = engine.add_parser("status", help="engine state, device and memory")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=status)
    p = engine.add_parser("stop", help="stop the engine (refuses while jobs run unless --force)")
    p.add_argument("--force", action="store_true", help="stop even with jobs running (they become interrupted)")
    p.set_defaults(func=stop)


def status(args) -> int:
    from engine.client import call

    info = call("status", start=False) if _running() else {"running": False}
    if args.json:
        print_json(info)
        return 0
    if not info.get("running", True):
        print("engine: not running (it starts on demand)")
        return 0
    device = info.get("device") or {}
    print(f"engine: running, pid {info.get('pid')}, up {info.get('uptime', 0):.0f}s, "
          f"{info.get('queue', 0)} queued, running {info.get('running') or 'nothing'}")
    print(f"device: {device.get('device', '?')} {device.get('name', '')}".rstrip())
    if "vram_total" in device:
        gib = 2**30
        print(f"vram: {device['vram_allocated'] / gib:.2f} GiB allocated, "
              f"{device['vram_reserved'] / gib:.2f} GiB reserved, {device['vram_total'] / gib:.1f} GiB total")
    return 0


def stop(args) -> int:
    from engine.client import call

    if not _running():
        print("engine: not running")
        return 0
    call("stop", force=args.force, start=False)
    print("engine: stopped")
    return 0


def _running() -> bool:
    from engine.client import EngineNotRunning, call

    try:
        call("ping", start=False)
        return True
    except (EngineNotRunning, ConnectionError, FileNotFoundError):
        return False
