"""Job kinds the worker can run.  Each handler turns a job spec into work.

A handler gets a `JobContext` (engine/jobs.py): its params, run directory,
`emit` for events, `cancelled()` and a `cache` that outlives the job, where
the loaded model stays warm for the next job.
"""

from __future__ import annotations


import contextlib
import errno

from engine.errors import UserError


def warm_model(ctx, spec: str | None, precision: str = "auto", device: str | None = None):
    """The model for this job, reusing the one already loaded when it matches."""
    from engine.gpu import frozen_dtype, pick_device
    from engine.models import load_model, resolve_spec

    spec = resolve_spec(spec)
    dev = pick_device(device)
    dtype = frozen_dtype(dev, precision)
    key = (spec, str(dev), str(dtype))
    cached = ctx.cache.get("model")
    if cached is None or cached[0] != key:
        ctx.cache.pop("model", None)  # one model at a time: give its memory back first
        ctx.emit("log", message=f"loading model {spec} on {dev} ({str(dtype).replace('torch.', '')})")
        ctx.cache["model"] = (key, load_model(spec, dev, dtype))
    return ctx.cache["model"][1]


class _ContextReporter:
    """Adapts a JobContext to the trainer's Reporter (events + progress in run.json)."""

    def __init__(self, ctx, mirror=None):
        self.ctx = ctx
        self.mirror = mirror  # a sweep: its first member's progress is the sweep's progress

    def emit(self, type: str, **fields) -> None:
        if type == "status":  # the worker owns the job's status; the trainer's is informative
            return
        self.ctx.emit(type, **fields)
        if type == "step":
            self.ctx.set_progress(step=fields["step"], steps=fields["steps"])
            if self.mirror is not None:
                self.mirror.emit("step", run=self.ctx.run_id, **fields)
                self.mirror.set_progress(step=fields["step"], steps=fields["steps"])
        elif type == "embedding" and fields.get("final"):
            self.ctx.set_progress(embedding=fields["path"])

    def cancelled(self) -> bool:
        return self.ctx.cancelled()


def train_config_from(params: dict, concept):
    """A TrainConfig from job params, filling token/init/property from the concept."""
    from engine.train import TrainConfig

    settings = {k: v for k, v in params.items() if k not in ("model", "precision", "device")}
    settings.setdefault("token", concept.token)
    settings["init"] = settings.get("init") or concept.init
    settings.setdefault("property", concept.property)
    return TrainConfig.from_dict(settings)


def handle_train(ctx) -> dict:
    from engine.library import Library
    from engine.train import train

    params = ctx.params
    concept = Library(ctx.home).get(ctx.spec["concept"])
    if not concept.images:
        raise UserError(f"concept {concept.name!r} has no training images; add images to it first")
    config = train_config_from(params, concept)
    config.validate()
    model = warm_model(ctx, params.get("model"), params.get("precision", "auto"), params.get("device"))
    ctx.set_progress(step=0, steps=config.steps, model=model.info.identity(), config=_asdict(config))
    with _friendly_failures():
        final = train(model, config, ctx.run_dir, concept.images, _ContextReporter(ctx), resume=True)
    return {"embedding": str(final)}


@contextlib.contextmanager
def _friendly_failures():
    """Turn the failures a user can act on into one-line messages that say what to do."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError("out of GPU memory; try --low-vram, a smaller --batch-size, or close other GPU programs") from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise UserError("the disk is full (no space left while saving); free some space, then resume this run") from None
    except FloatingPointError as exc:
        raise UserError(f"{exc}; the last good checkpoint is kept — resume with a lower --lr or --precision fp32") from None


def _asdict(config) -> dict:
    from dataclasses import asdict

    return asdict(config)


def handle_sweep(ctx) -> dict:
    """K runs of one concept (seeds x initializer words) batched into one UNet call per step."""
    from engine.jobs import set_status
    from engine.library import Library
    from engine.sweeps import create_members, member_contexts
    from engine.train import RunSlot, train_many

    concept = Library(ctx.home).get(ctx.spec["concept"])
    if not concept.images:
        raise UserError(f"concept {concept.name!r} has no training images; add images to it first")
    members = member_contexts(ctx, create_members(ctx))
    slots = []
    for k, member in enumerate(members):
        config = train_config_from(member.params, concept)
        config.validate()
        reporter = _ContextReporter(member, mirror=ctx if k == 0 else None)
        slots.append(RunSlot(config, member.run_dir, concept.images, reporter))
    model = warm_model(ctx, ctx.params.get("model"), ctx.params.get("precision", "auto"), ctx.params.get("device"))
    ctx.set_progress(step=0, steps=slots[0].config.steps, model=model.info.identity())
    with _friendly_failures():
        finals = train_many(model, slots, resume=True)
    for member, final in zip(members, finals):
        member.flush()
        set_status(member.run_dir, "done", log=member.log, embedding=str(final), result={"embedding": str(final)})
    ctx.set_progress(step=slots[0].config.steps)
    return {"members": [m.run_id for m in members], "embeddings": [str(f) for f in finals]}


HANDLERS = {
    "train": handle_train,
    "sweep": handle_sweep,
}

