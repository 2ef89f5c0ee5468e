"""Sweeps: K member runs of one concept trained together, one UNet call per step; and the
two pieces every job-driven training run uses (`train_config_from` job params,
`ContextReporter` to the run's log), of which a plain `train` job is the K=1 case.

A sweep member is a full run directory of kind "train" (`parent` names the job
that trains it, when there is one), so export, generate and eval treat it like
any other run.  Members get their own events.jsonl; if the process dies, the
engine settles them with their parent job.

A sweep may be split over several workers (engine.server.placement), one group of members
per worker, each group still batched.  A group trains only its members; a member
already done is not trained again, and members left at different checkpoints (a
split sweep interrupted) are trained in turn, one batch per checkpoint step, since
runs batched together share one step counter.  Per-layer members (P+, `per-layer` in a
method) and plain ones are trained as two batches: their prompts are encoded differently.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from engine.errors import JobCancelled
from engine.settings.train import sweep_members
from engine.store.runs import FINAL, load_run, set_status
from engine.store.sweeps import chunk, create_members, is_done, latest_step
from engine.worker.context import JobContext


def train_config_from(params: dict, concept):
    """A TrainConfig from job params, filling token/init/property from the concept (the CLI and the
    studio build their params with the same function; here keys this version does not know, from
    an older record, are ignored rather than refused)."""
    from engine.settings.train import config_from_params

    return config_from_params(params, concept, strict=False)


class ContextReporter:
    """Adapts a JobContext to the trainer's Reporter: events to the log, progress to run.json."""

    def __init__(self, ctx: JobContext, on_step: Callable[[dict], None] | None = None):
        self.ctx = ctx
        self.on_step = on_step
        self.warnings: list[dict] = []  # this run's warning events, for run.json

    def emit(self, type: str, **fields) -> None:
        if type == "status":  # the worker (or the sweep) owns the run's status
            return
        self.ctx.emit(type, **fields)
        if type == "step":
            self.ctx.set_progress(step=fields["step"], steps=fields["steps"])
            if self.on_step:
                self.on_step({"run": self.ctx.run_id, **fields})
        elif type == "embedding" and fields.get("final"):
            self.ctx.set_progress(embedding=fields["path"])
        elif type == "train" and "images" in fields:  # what the run trains on: its buckets, masks, captions
            self.ctx.set_progress(data={key: fields.get(key) for key in ("images", "masked", "captioned", "buckets")})
        elif type == "stopped":  # where and why it stopped (a rule, or its last step): run.json says it
            self.ctx.set_progress(step=fields["step"], stopped={k: fields.get(k) for k in ("step", "rule", "why")})
        elif type == "best":  # the run's best probed step so far: what NAME@RUN:best resolves to
            self.ctx.set_progress(best=fields.get("best"))
        elif type == "watch":  # a (resumed) run's start: all three as its replayed history left them
            self.warnings = list((fields.get("warned") or {}).values())
            self.ctx.set_progress(best=fields.get("best"), stopped=fields.get("stopped"), warnings=self.warnings)
        elif type == "warning":  # a word that is not learning says so, in the record too (`tistudio runs`)
            self.warnings.append({k: fields.get(k) for k in ("step", "kind", "message")})
            self.ctx.set_progress(warnings=self.warnings)

    def cancelled(self) -> bool:
        return self.ctx.cancelled()


def train_sweep(ctx: JobContext, model, concept, params: dict, extra: list[dict] | None = None,
                on_step: Callable[[dict], None] | None = None) -> tuple[list[JobContext], list[Path]]:
    """Train the member runs of sweep job `ctx` together; returns the members and their final embeddings.

    On the job's first attempt the members are made from `params` (`engine.settings.train.sweep_members`), each
    with its `extra` run.json fields, after every member's settings are checked, so a bad
    one leaves no run behind.  On a resume they are found again in the job's run.json.
    A job split over workers (ctx.spec["group"], engine.wire.protocol.SweepGroup) trains only
    its group's members, and returns only those."""
    from engine.store.library import initializer_ids

    group = ctx.spec.get("group")
    names = load_run(ctx.run_dir).get("members") or []
    if not names and group and group["index"] > 0:
        names = _wait_for_members(ctx)  # the lead group's worker makes them
    if not names:
        # Each member records the initializer it really starts from (the concept's, unless set).
        member_params = [{**p, "init": p.get("init") or concept.init} for p in sweep_members(params)]
        for p in member_params:
            config = train_config_from(p, concept)
            config.validate()
            if config.per_layer:
                model.info.require_layers()  # SDXL, an unmappable UNet: one line, before any member exists
            if not config.init_from:
                initializer_ids(model.tokenizer, config.init, config.vectors)
        names = [d.name for d in create_members(ctx.home, concept.name, member_params, parent=ctx.run_id,
                                                extra=extra)]
        ctx.set_progress(members=names)
    if group:
        names = group.get("members") or chunk(names, group["count"])[group["index"]]
    dirs = [ctx.run_dir.parent / name for name in names]
    for batch in _batches(dirs):
        members = start_members(ctx.home, batch, send=ctx.send, is_cancelled=ctx.is_cancelled,
                                placement=ctx.placement)
        train_members(model, concept, members, on_step=on_step)
    members = [_member_context(ctx, run_dir) for run_dir in dirs]
    return members, [m.run_dir / "learned_embeds.safetensors" for m in members]


def _wait_for_members(ctx: JobContext, poll: float = 0.1) -> list[str]:
    """A helper group on a sweep's first attempt: wait (having loaded the model meanwhile) until
    the lead has made the members and written them to the sweep's run.json.  The server
    cancels this wait if the lead ends without making them."""
    while True:
        ctx.check_cancel()
        try:
            names = load_run(ctx.run_dir).get("members") or []
        except (OSError, ValueError):  # being rewritten (atomically) right now: look again
            names = []
        if names:
            return names
        time.sleep(poll)


def _batches(dirs: list[Path]) -> list[list[Path]]:
    """The members still to train, one batch per checkpoint step they stand at (furthest first),
    plain and per-layer words apart: runs batched together share one step counter and one way
    of encoding their prompts."""
    by_step: dict[tuple[int, bool], list[Path]] = {}
    for run_dir in dirs:
        if not is_done(run_dir):
            per_layer = bool((load_run(run_dir).get("params") or {}).get("per_layer"))
            by_step.setdefault((latest_step(run_dir), per_layer), []).append(run_dir)
    batches = [by_step[key] for key in sorted(by_step, key=lambda key: (-key[0], key[1]))]
    # --buckets: one run at a time (each draws its own image size at every step; a batch holds one)
    if any((load_run(run_dir).get("params") or {}).get("buckets") for run_dir in dirs):
        return [[run_dir] for batch in batches for run_dir in batch]
    return batches


def _member_context(ctx: JobContext, run_dir: Path) -> JobContext:
    record = load_run(run_dir)
    return JobContext({"kind": "train", "concept": record["concept"], "params": record["params"]},
                      run_dir.name, run_dir, ctx.home, send=ctx.send, is_cancelled=ctx.is_cancelled)


def start_members(home: Path, dirs: list[Path], send=None, is_cancelled=None,
                  placement: dict | None = None) -> list[JobContext]:
    """A JobContext per member (its own log; live events to its subscribers), marked running
    (with `placement`: the device and node it runs on)."""
    members = []
    for run_dir in dirs:
        record = load_run(run_dir)
        member = JobContext({"kind": "train", "concept": record["concept"], "params": record["params"]},
                            run_dir.name, run_dir, home, send=send, is_cancelled=is_cancelled)
        set_status(run_dir, "running", log=member.log, pid=os.getpid(), **(placement or {}))
        members.append(member)
    return members


def train_members(model, concept, members: list[JobContext], on_step=None) -> list[Path]:
    """Train the members together (resuming from their checkpoints); each ends done, or
    cancelled/failed with the sweep — never left running."""
    from engine.inversion.train import RunSlot, train_many

    slots = []
    for k, member in enumerate(members):
        config = train_config_from(member.params, concept)
        config.validate()
        reporter = ContextReporter(member, on_step=on_step if k == 0 else None)
        slots.append(RunSlot(config, member.run_dir, concept.images, reporter, description=concept.description))
    try:
        finals = train_many(model, slots, resume=True)
    except BaseException as exc:
        status = "cancelled" if isinstance(exc, JobCancelled) else "failed"
        _settle(members, status, None if status == "cancelled" else f"{type(exc).__name__}: {exc}")
        raise
    for member, final in zip(members, finals):
        member.flush()
        set_status(member.run_dir, "done", log=member.log, embedding=str(final), result={"embedding": str(final)})
    return finals


def _settle(members: list[JobContext], status: str, error: str | None) -> None:
    for member in members:
        try:
            if load_run(member.run_dir).get("status") not in FINAL:
                set_status(member.run_dir, status, log=member.log, error=error)
        except OSError:
            pass  # a full disk: the engine settles the members with their job, from memory if need be
