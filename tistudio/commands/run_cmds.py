"""runs, cancel, attach: jobs in the engine, followed from the terminal; runs export: a run's history as
TensorBoard logs."""

from __future__ import annotations

import asyncio
import sys

from tistudio.commands.output import print_json, print_table

RUN_FIELDS = ("id", "concept", "kind", "status", "step", "steps", "device", "node", "pid", "embedding", "best",
              "stopped", "warnings")


def add_commands(sub) -> None:
    p = sub.add_parser("runs", help="list runs and jobs; `runs export` writes a run's history for other tools")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=runs)
    export = p.add_subparsers(dest="runs_action", metavar="ACTION").add_parser(
        "export", help="write a run's loss, learning rate, vector norm, probes and previews as TensorBoard logs")
    export.add_argument("run", help="the run id (`tistudio runs` lists them); a sweep: each of its member runs")
    export.add_argument("--tensorboard", metavar="DIR", required=True,
                        help="write TensorBoard event files to DIR/<run id>/ (replacing what an earlier export "
                             "wrote there); `tensorboard --logdir DIR` compares runs. Needs "
                             "pip install 'tistudio[tensorboard]'")
    export.set_defaults(func=export_run)

    p = sub.add_parser("cancel", help="cancel a queued or running job (training leaves a resumable checkpoint)")
    p.add_argument("run")
    p.set_defaults(func=cancel)

    p = sub.add_parser("attach", help="replay a run's history and follow it live")
    p.add_argument("run")
    p.add_argument("--json", action="store_true", help="print raw events as JSON lines")
    add_tensorboard_option(p)
    p.set_defaults(func=attach)


def add_tensorboard_option(parser) -> None:
    """--tensorboard DIR on a command that follows a run (train, resume, attach)."""
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="write the run's loss, learning rate, vector norm, probes and previews to "
                             "DIR/<run id>/ as TensorBoard logs while this command follows it (the whole run "
                             "again once it ends); a run not followed (--detach, a closed terminal): "
                             "`tistudio attach RUN --tensorboard DIR` or `tistudio runs export RUN "
                             "--tensorboard DIR`. Needs pip install 'tistudio[tensorboard]'")


def runs(args) -> int:
    """Every run, read from disk; when an engine is running, with its live view laid over
    (step, status it holds in memory).  Never starts an engine."""
    from tistudio.commands.engine_cmds import warn_if_not_writable
    from tistudio.formatting import watch_cells

    records, engine_up, storage = _run_records()
    jobs = [_listed(r, engine_up) for r in records]
    warn_if_not_writable(storage)
    if args.json:
        print_json(jobs)
        return 0
    if not jobs:
        print("no runs yet; start one with `tistudio train NAME`")
        return 0
    print_table("runs", ["id", "concept", "kind", "status", "step", "best", "stopped", "device", "pid"],
                [[j["id"], j["concept"], j["kind"], _status_cell(j), f"{j['step']}/{j['steps'] or '?'}",
                  *watch_cells(j), _device_cell(j), j["pid"]] for j in jobs])
    for j in jobs:
        for warning in j.get("warnings") or []:
            print(f"warning: {j['id']} at step {warning.get('step')}: {warning.get('message')}")
    if any(j.get("stale") for j in jobs):
        print("* no engine is running: the engine that ran these stopped; they show as interrupted "
              "once one starts, and `tistudio resume RUN` continues them")
    return 0


def _run_records() -> tuple[list[dict], bool, dict]:
    """(records, whether an engine answered, its storage health)."""
    from engine.store.runs import list_runs
    from engine.wire.client import EngineNotRunning, call
    from tistudio.commands.output import home

    try:
        listing = call("listing", start=False)
    except EngineNotRunning:
        return list_runs(home()), False, {}
    return listing["jobs"], True, listing.get("storage") or {}


def _listed(record: dict, engine_up: bool) -> dict:
    from engine.store.runs import ACTIVE

    row = {k: record.get(k) for k in RUN_FIELDS}
    if record.get("unsaved"):
        row["unsaved"] = record["unsaved"]  # the engine holds this status in memory: the disk refused it
    if not engine_up and row["status"] in ACTIVE:
        row["stale"] = True  # left queued/running by an engine that is gone
    return row


def _device_cell(row: dict) -> str | None:
    """The device a run used (run.json `device`; a split sweep running now: each of its groups'),
    and the Ray node it ran on."""
    device = row.get("device")
    if isinstance(device, list):
        device = ", ".join(device)
    if device and row.get("node"):
        device += f" @ {row['node']}"
    return device


def _status_cell(row: dict) -> str:
    if row.get("stale"):
        return f"{row['status']}*"
    if row.get("unsaved"):
        return f"{row['status']} (in memory)"
    return row["status"]


def export_run(args) -> int:
    from engine.store.tensorboard import export_run
    from tistudio.commands.output import home

    for folder in export_run(home(), args.run, args.tensorboard):
        print(f"wrote {folder}")
    print(f"see them with: tensorboard --logdir {args.tensorboard}")
    return 0


def cancel(args) -> int:
    from engine.wire.client import call

    print(f"{args.run}: {call('cancel', args.run)}")
    return 0


def attach(args) -> int:
    return asyncio.run(_follow(args.run, cancel_on_interrupt=False, raw=args.json, report=True,
                               tensorboard=args.tensorboard))


async def _follow(run_id: str, cancel_on_interrupt: bool, raw: bool = False, quiet: bool = False,
                  report: bool = False, tensorboard: str | None = None) -> int:
    """Replay and follow a run with a progress bar; Ctrl-C cancels (train) or detaches (attach).
    report: a run that ends failed or interrupted says why in one line on stderr.
    tensorboard: a folder the run's figures go to as TensorBoard logs, as they arrive."""
    from engine.wire.client import EngineClient
    from tistudio.commands.progress import RunProgress

    board = _board(tensorboard, run_id)
    client = EngineClient()
    await client.connect()
    view = RunProgress(run_id, raw=raw, quiet=quiet)
    try:
        with view:
            await _stream(client, run_id, view, board)
    except (KeyboardInterrupt, asyncio.CancelledError):
        if not cancel_on_interrupt:
            print(f"detached; the run goes on (`tistudio attach {run_id}` to follow it again)")
            return 0
        await client.cancel(run_id)
        status = await client.wait(run_id)
        print(f"run {run_id} {status}; continue it with `tistudio resume {run_id}`")
        return 130
    finally:
        await client.close()
        if board is not None:
            for folder in board.close(view.status):
                view.note(f"TensorBoard: {folder}")
    if report and view.status in ("failed", "interrupted"):
        print(f"tistudio: error: run {run_id} {view.status}: {view.error or 'see `tistudio runs`'}", file=sys.stderr)
    return view.exit_code()


def _board(folder: str | None, run_id: str):
    """The LiveBoard writing a followed run's TensorBoard logs to `folder`, or None."""
    if not folder:
        return None
    from engine.store.tensorboard import LiveBoard
    from tistudio.commands.output import home

    return LiveBoard(folder, run_id, home())


async def _stream(client, run_id: str, view, board=None, retries: int = 3) -> None:
    """Feed the view (and the TensorBoard board); if the engine restarts under us, reconnect and
    go on from the last seq."""
    from engine.errors import EngineError

    last_seq = 0
    for attempt in range(retries + 1):
        try:
            async for event in client.events(run_id, after_seq=last_seq):
                last_seq = event.get("seq", last_seq)
                view.update(event)
                if board is not None:
                    board.add(event)
            return
        except EngineError:
            if attempt == retries:
                raise
            view.note("the engine went away; reconnecting (a run it was running becomes interrupted)")
            await asyncio.sleep(0.5)
            await client.connect()
