"""Sweeps: K runs (seeds x initializer words) trained together, one UNet call per step.

A sweep is a job with its own run directory; each of its K members is a full
run directory of kind "train" beside it (`parent` names the sweep), so export,
generate and eval treat a member like any other run.  Members get their own
events.jsonl; the server settles members with their parent if the job dies.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from engine.jobs import JobContext, create_run, load_run, set_status, update_run

MEMBER_OVERRIDES = ("seed", "init")


def member_params(params: dict) -> list[dict]:
    """The cartesian product of `seeds` x `inits` over the shared training params."""
    base = {k: v for k, v in params.items() if k not in ("seeds", "inits")}
    seeds = params.get("seeds") or [base.get("seed", 0)]
    inits = params.get("inits") or [base.get("init")]
    return [{**base, "seed": int(s), "init": i} for s, i in itertools.product(seeds, inits)]


def create_members(ctx: JobContext, params: dict | None = None) -> list[Path]:
    """The member run directories: made on the first attempt, found again on resume."""
    known = load_run(ctx.run_dir).get("members")
    if known:
        return [ctx.run_dir.parent / m for m in known]
    dirs = []
    for member in member_params(ctx.params if params is None else params):
        run_dir = create_run(ctx.home, {"kind": "train", "concept": ctx.spec["concept"], "params": member})
        update_run(run_dir, parent=ctx.run_id)
        dirs.append(run_dir)
    ctx.set_progress(members=[d.name for d in dirs])
    return dirs


def member_contexts(ctx: JobContext, dirs: list[Path]) -> list[JobContext]:
    """A JobContext per member: events go to the member's own log and live to its subscribers."""
    members = []
    for run_dir in dirs:
        record = load_run(run_dir)
        member = JobContext({"kind": "train", "concept": ctx.spec["concept"], "params": record["params"]},
                            run_dir.name, run_dir, ctx.home, send=ctx.send, is_cancelled=ctx.is_cancelled)
        set_status(run_dir, "running", log=member.log, pid=os.getpid(), started=record.get("started"))
        members.append(member)
    return members
