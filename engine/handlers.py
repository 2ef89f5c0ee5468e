"""Job kinds the worker can run.  Each handler turns a job spec into work.

A handler gets a `JobContext` (engine/jobs.py): its params, run directory,
`emit` for events, `cancelled()` and a `cache` that outlives the job, where
the loaded model stays warm for the next job.
"""

from __future__ import annotations


import contextlib

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

    def __init__(self, ctx):
        self.ctx = ctx

    def emit(self, type: str, **fields) -> None:
        self.ctx.emit(type, **fields)
        if type == "step":
            self.ctx.set_progress(step=fields["step"], steps=fields["steps"])
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
    except FloatingPointError as exc:
        raise UserError(f"{exc}; the last good checkpoint is kept — resume with a lower --lr or --precision fp32") from None


def _asdict(config) -> dict:
    from dataclasses import asdict

    return asdict(config)


HANDLERS = {
    "train": handle_train,
}

