"""train, resume, runs, cancel, attach: jobs in the engine, followed from the terminal."""

from __future__ import annotations

import asyncio
import sys

from tistudio.commands.output import print_json, print_table

RUN_FIELDS = ("id", "concept", "kind", "status", "step", "steps", "pid", "embedding")


def _positive_int(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _int_list(text: str) -> list[int]:
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def _word_list(text: str) -> list[str]:
    import argparse

    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError("give at least one word")
    return words


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a concept's word (a job in the engine; survives a closed terminal)")
    p.add_argument("name")
    p.add_argument("--steps", type=_positive_int, default=2000, help="optimizer steps (study: 1500-2400; default 2000)")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate (default 5e-4, the study's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="initializer word for this run (default: the concept's)")
    p.add_argument("--seeds", type=_int_list, help="a sweep: one run per seed, trained together (e.g. 1,2,3,4)")
    p.add_argument("--inits", type=_word_list, help="a sweep: one run per initializer word (e.g. fish,dragon)")
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--lr-schedule", choices=("constant", "warmup", "cosine"), default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--save-every", type=_positive_int, default=500, help="save embedding + checkpoint every N steps")
    p.add_argument("--preview-every", type=int, default=500, help="preview image every N steps (0: off)")
    p.add_argument("--preview-prompt", help="prompt for previews; {token} or the token stands for the concept")
    p.add_argument("--center-crop", action="store_true", help="crop images to a centred square before resizing")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="frozen weights' dtype (auto: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--detach", action="store_true", help="print the run id and return at once")
    p.set_defaults(func=train)

    p = sub.add_parser("resume", help="continue a cancelled, failed or interrupted run from its last checkpoint")
    p.add_argument("run")
    p.add_argument("--detach", action="store_true")
    p.set_defaults(func=resume)

    p = sub.add_parser("runs", help="list runs and jobs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=runs)

    p = sub.add_parser("cancel", help="cancel a queued or running job (training leaves a resumable checkpoint)")
    p.add_argument("run")
    p.set_defaults(func=cancel)

    p = sub.add_parser("attach", help="replay a run's history and follow it live")
    p.add_argument("run")
    p.add_argument("--json", action="store_true", help="print raw events as JSON lines")
    p.set_defaults(func=attach)


def _train_params(args) -> dict:
    import os

    params = {
        "steps": args.steps, "lr": args.lr, "seed": args.seed, "batch_size": args.batch_size,
        "lr_schedule": args.lr_schedule, "warmup_steps": args.warmup_steps, "save_every": args.save_every,
        "preview_every": args.preview_every, "center_crop": args.center_crop, "precision": args.precision,
        "model": os.environ.get("TISTUDIO_MODEL") or None,
    }
    if args.init:
        params["init"] = args.init
    if args.seeds:
        params["seeds"] = args.seeds
    if args.inits:
        params["inits"] = args.inits
    if args.preview_prompt:
        params["preview_prompt"] = args.preview_prompt
    return params


def _check_before_submit(args) -> None:
    """Catch the mistakes we can see here, so they fail now and not in the queue."""
    from engine.errors import UserError
    from engine.library import Library, check_initializer
    from engine.models import load_tokenizer, model_info
    from tistudio.commands.output import home

    concept = Library(home()).get(args.name)
    if not concept.images:
        raise UserError(f"concept {concept.name!r} has no training images (it was imported); train another concept")
    if args.lr <= 0:
        raise UserError("--lr must be a positive number, e.g. 5e-4")
    model_info()  # a bad --model fails here, with its own message
    tokenizer = load_tokenizer()
    for word in args.inits or [args.init or concept.init]:
        check_initializer(tokenizer, word)


def train(args) -> int:
    from engine.client import call

    _check_before_submit(args)
    kind = "sweep" if (args.seeds and len(args.seeds) > 1) or (args.inits and len(args.inits) > 1) else "train"
    params = _train_params(args)
    if kind == "train":  # a "sweep" of one is a plain run
        params["seed"] = (args.seeds or [args.seed])[0]
        params.pop("seeds", None)
        if args.inits:
            params["init"] = params.pop("inits")[0]
    run_id = call("submit", kind, concept=args.name, params=params)
    return _after_submit(run_id, args.detach)


def resume(args) -> int:
    from engine.client import call

    run_id = call("submit", resume=args.run)
    return _after_submit(run_id, args.detach)


def _after_submit(run_id: str, detach: bool) -> int:
    if detach:
        print(run_id)
        return 0
    print(f"run {run_id} (Ctrl-C cancels it, resumable; it keeps running if the terminal closes)")
    return asyncio.run(_follow(run_id, cancel_on_interrupt=True, report=True))


def runs(args) -> int:
    """Every run, read from disk; when an engine is running, with its live view laid over
    (step, status it holds in memory).  Never starts an engine."""
    from tistudio.commands.engine_cmds import warn_if_not_writable

    records, engine_up, storage = _run_records()
    jobs = [_listed(r, engine_up) for r in records]
    warn_if_not_writable(storage)
    if args.json:
        print_json(jobs)
        return 0
    if not jobs:
        print("no runs yet; start one with `tistudio train NAME`")
        return 0
    print_table("runs", ["id", "concept", "kind", "status", "step", "pid"],
                [[j["id"], j["concept"], j["kind"], _status_cell(j), f"{j['step']}/{j['steps'] or '?'}", j["pid"]]
                 for j in jobs])
    if any(j.get("stale") for j in jobs):
        print("* no engine is running: the engine that ran these stopped; they show as interrupted "
              "once one starts, and `tistudio resume RUN` continues them")
    return 0


def _run_records() -> tuple[list[dict], bool, dict]:
    """(records, whether an engine answered, its storage health)."""
    from engine.client import EngineNotRunning, call
    from engine.jobs import list_runs
    from tistudio.commands.output import home

    try:
        listing = call("listing", start=False)
    except EngineNotRunning:
        return list_runs(home()), False, {}
    return listing["jobs"], True, listing.get("storage") or {}


def _listed(record: dict, engine_up: bool) -> dict:
    from engine.jobs import ACTIVE

    row = {k: record.get(k) for k in RUN_FIELDS}
    if record.get("unsaved"):
        row["unsaved"] = record["unsaved"]  # the engine holds this status in memory: the disk refused it
    if not engine_up and row["status"] in ACTIVE:
        row["stale"] = True  # left queued/running by an engine that is gone
    return row


def _status_cell(row: dict) -> str:
    if row.get("stale"):
        return f"{row['status']}*"
    if row.get("unsaved"):
        return f"{row['status']} (in memory)"
    return row["status"]


def cancel(args) -> int:
    from engine.client import call

    print(f"{args.run}: {call('cancel', args.run)}")
    return 0


def attach(args) -> int:
    return asyncio.run(_follow(args.run, cancel_on_interrupt=False, raw=args.json, report=True))


async def _follow(run_id: str, cancel_on_interrupt: bool, raw: bool = False, quiet: bool = False,
                  report: bool = False) -> int:
    """Replay and follow a run with a progress bar; Ctrl-C cancels (train) or detaches (attach).
    report: a run that ends failed or interrupted says why in one line on stderr."""
    from engine.client import EngineClient
    from tistudio.commands.progress import RunProgress

    client = EngineClient()
    await client.connect()
    view = RunProgress(run_id, raw=raw, quiet=quiet)
    try:
        with view:
            await _stream(client, run_id, view)
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
    if report and view.status in ("failed", "interrupted"):
        print(f"tistudio: error: run {run_id} {view.status}: {view.error or 'see `tistudio runs`'}", file=sys.stderr)
    return view.exit_code()


async def _stream(client, run_id: str, view, retries: int = 3) -> None:
    """Feed the view; if the engine restarts under us, reconnect and go on from the last seq."""
    from engine.errors import EngineError

    last_seq = 0
    for attempt in range(retries + 1):
        try:
            async for event in client.events(run_id, after_seq=last_seq):
                last_seq = event.get("seq", last_seq)
                view.update(event)
            return
        except EngineError:
            if attempt == retries:
                raise
            view.note("the engine went away; reconnecting (a run it was running becomes interrupted)")
            await asyncio.sleep(0.5)
            await client.connect()
