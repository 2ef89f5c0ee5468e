"""Job kinds the worker can run.  Each handler turns a job spec into work.

A handler gets a `JobContext` (engine/store/runs.py): its params, run directory,
`emit` for events, `cancelled()` and a `cache` that outlives the job, where
the loaded model stays warm for the next job.
"""

from __future__ import annotations

import contextlib

from engine.errors import UserError


def job_model(ctx, params: dict):
    """The model a job's params name (model, prediction_type, model_resolution, precision, device)."""
    from engine.settings.model import ModelOptions

    return warm_model(ctx, params.get("model"), params.get("precision", "auto"), params.get("device"),
                      ModelOptions.from_params(params))


def warm_model(ctx, spec: str | None, precision: str = "auto", device: str | None = None, options=None):
    """The model for this job, reusing the one already loaded when it matches.  A note about
    how the model was read (an SD 2.x file's guessed prediction type) goes to the job's log
    as a warning, every time the model serves a job."""
    from engine.sd.models import load_model

    key, dev, dtype, options = _model_key(spec, precision, device, options)
    cached = ctx.cache.get("model")
    if cached is None or cached[0] != key:
        drop_model(ctx.cache)  # one model at a time: give its memory back first
        ctx.emit("log", message=f"loading model {key[0]} on {dev} ({str(dtype).replace('torch.', '')})")
        ctx.cache["model"] = (key, load_model(key[0], dev, dtype, options))
    model = ctx.cache["model"][1]
    if model.info.note:
        ctx.emit("log", message=model.info.note, level="warning")
    return model


def remember_model(cache: dict, model, spec: str | None, precision: str = "auto", device: str | None = None,
                   options=None) -> None:
    """Put a model already loaded from `spec` into a worker cache, as warm_model would
    (tests and notebooks reuse one model across jobs this way)."""
    cache["model"] = (_model_key(spec, precision, device, options)[0], model)


def _model_key(spec: str | None, precision: str, device: str | None, options=None):
    """(spec, its qualifiers, device, dtype) as the cache knows a model, plus the device, the
    dtype and the qualifiers themselves (a spec read as epsilon is another model than as v)."""
    from engine.devices.runtime import frozen_dtype, pick_device
    from engine.sd.models import resolve_options, resolve_spec

    dev = pick_device(device)
    dtype = frozen_dtype(dev, precision)
    options = resolve_options(spec, options)
    return (resolve_spec(spec), options, str(dev), str(dtype)), dev, dtype, options


def handle_train(ctx) -> dict:
    from engine.inversion.train import train
    from engine.worker.sweeps import ContextReporter, train_config_from

    params = ctx.params
    concept = _trainable_concept(ctx)
    config = train_config_from(params, concept)
    config.validate()
    model = job_model(ctx, params)
    ctx.set_progress(step=0, steps=config.steps, model=model.info.identity(), config=_asdict(config),
                     effective_batch=config.effective_batch())
    with _friendly_failures():
        final = train(model, config, ctx.run_dir, concept.images, ContextReporter(ctx), resume=True,
                      description=concept.description)
    return {"embedding": str(final)}


@contextlib.contextmanager
def _friendly_failures():
    """Turn the failures a user can act on into one-line messages that say what to do
    (a full disk is the worker's: it says so for every job kind)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError("out of GPU memory; try --low-vram, a smaller --batch-size, "
                        "or close other GPU programs") from None
    except FloatingPointError as exc:
        raise UserError(f"{exc}; the last good checkpoint is kept — "
                        "resume with a lower --lr or --precision fp32") from None


def _asdict(config) -> dict:
    from dataclasses import asdict

    return asdict(config)


def handle_sweep(ctx) -> dict:
    """K runs of one concept (seeds x initializer words) batched into one UNet call per step."""
    from engine.worker.sweeps import train_sweep

    params = ctx.params
    concept = _trainable_concept(ctx)
    model = job_model(ctx, params)
    ctx.set_progress(step=0, model=model.info.identity())

    def mirror(fields: dict) -> None:  # the sweep's own log and progress follow its first member
        ctx.emit("step", **fields)
        ctx.set_progress(step=fields["step"], steps=fields["steps"])

    with _friendly_failures():
        members, finals = train_sweep(ctx, model, concept, params, on_step=mirror)
    return {"members": [m.run_id for m in members], "embeddings": [str(f) for f in finals]}


def drop_model(cache: dict) -> None:
    """Let the warm model go, with the compiled UNet it holds (whose compiled code and CUDA
    graphs would otherwise keep its memory)."""
    cached = cache.pop("model", None)
    if cached is not None:
        from engine.inversion.compiled import release_compiled

        release_compiled(cached[1])


def held(cache: dict) -> dict:
    """What a worker keeps between jobs, for `engine status`: its warm model and, when a job
    compiled one, the compiled UNet ({"mode", "batch", "resolution", "low_vram"})."""
    cached = cache.get("model")
    if cached is None:
        return {}
    from engine.inversion.compiled import compiled_held

    model = cached[1]
    found = {"model": model.info.spec, "dtype": str(model.dtype).replace("torch.", "")}
    compiled = compiled_held(model)
    return {**found, "compiled_unet": compiled} if compiled else found


def _trainable_concept(ctx):
    from engine.store.library import Library

    concept = Library(ctx.home).get(ctx.spec["concept"])
    if not concept.images:
        raise UserError(f"concept {concept.name!r} has no training images; add images to it first")
    return concept


# --- generation, evaluation, experiments ---------------------------------------------------------


class _Progress:
    """progress(message, fraction) -> throttled `progress` events and run.json progress."""

    def __init__(self, ctx, every: float = 0.5):
        import time

        self.ctx, self.every, self.clock, self.last = ctx, every, time.monotonic, 0.0

    def __call__(self, message: str, fraction: float) -> None:
        now = self.clock()
        if now - self.last >= self.every or fraction >= 1.0:
            self.last = now
            self.ctx.emit("progress", message=message, fraction=round(float(fraction), 4))
            self.ctx.set_progress(step=int(1000 * fraction), steps=1000)


def _sampling(params: dict) -> dict:
    # An experiment's params also hold its runs' training settings, batch_size among them:
    # the sampling batch has its own key.
    keys = {"sample_steps": "sample_steps", "guidance": "guidance", "batch_size": "sample_batch_size"}
    return {ours: params[theirs] for ours, theirs in keys.items() if params.get(theirs) is not None}


def _clip(params: dict) -> tuple[str, str | None]:
    from engine.inversion.judge import default_clip

    return params.get("clip") or default_clip(params.get("model")), params.get("clip_weights")


def handle_generate(ctx) -> dict:
    from engine.sd.generation import GenerateRequest, generate
    from engine.store.library import Library

    p = ctx.params
    request = GenerateRequest.from_params(p)
    request.validate()
    model = job_model(ctx, p)
    with _friendly_failures():
        images = generate(model, Library(ctx.home), request, _Progress(ctx), ctx.cancelled)
    for image in images:
        ctx.emit("image", **{k: image[k] for k in ("path", "mode", "seed", "prompt")})
    return {"images": [{k: i[k] for k in ("path", "prompt", "seed", "mode")} for i in images]}


def handle_eval(ctx) -> dict:
    from engine.inversion.metrics import evaluate
    from engine.store.library import Library

    p = ctx.params
    clip, clip_weights = _clip(p)
    model = job_model(ctx, p)
    with _friendly_failures():
        table = evaluate(model, Library(ctx.home), ctx.spec["concept"], run_id=p.get("run"), step=p.get("step"),
                         images=int(p.get("images", 16)), prompts_file=p.get("prompts_file"), clip=clip,
                         clip_weights=clip_weights, seed=int(p.get("seed", 0)), progress=_Progress(ctx),
                         cancelled=ctx.cancelled, dino=p.get("dino"), **_sampling(p))
    ctx.emit("table", rows=table["rows"], dir=table["dir"])
    return {"table": {k: v for k, v in table.items() if k not in ("images",)}, "report_dir": table["dir"]}


def handle_experiment(ctx) -> dict:
    """The paper's section 4: steps (one run's checkpoints); init words, seeds or regularisers (a sweep, then
    a report); and section 5's synthesis batches."""
    from engine.store.library import Library
    from engine.worker import experiments

    p = ctx.params
    kind = p.get("kind")
    if kind not in ("steps", "synthesis", *experiments.SWEEP_AXES):
        raise UserError(f"unknown experiment {kind!r}; choose steps, init, seeds, regularize or synthesis")
    clip, clip_weights = _clip(p)
    common = dict(images=int(p.get("images", 2 if kind == "synthesis" else 4)), clip=clip, clip_weights=clip_weights,
                  progress=_Progress(ctx), cancelled=ctx.cancelled, **_sampling(p))
    if p.get("prompts"):
        common["prompts"] = list(p["prompts"])
    if p.get("dino") and kind != "synthesis":  # a DINO column beside CLIP's reconstruction
        common["dino"] = p["dino"]
    model = job_model(ctx, p)
    library = Library(ctx.home)
    with _friendly_failures():
        if kind == "steps":
            report = experiments.steps_experiment(model, library, ctx.spec["concept"], run_id=p.get("run"),
                                                  at=p.get("at"), **common)
        elif kind == "synthesis":
            settings = {k: v for k, v in common.items() if k not in ("clip", "clip_weights")}
            report = experiments.synthesis_experiment(model, library, ctx.spec["concept"], run_id=p.get("run"),
                                                      step=p.get("step"), **settings)
        else:
            train = {k: v for k, v in p.items() if k in _train_keys()}
            seeds = {"seeds": p["seeds"]} if kind == "regularize" and p.get("seeds") else {}  # methods x seeds
            report = experiments.sweep_experiment(ctx, model, library, kind, p.get("values") or [], train, **common,
                                                  **seeds)
    return {k: v for k, v in report.items() if k not in ("images",)}


def _train_keys() -> set[str]:
    """The params of an experiment job that are training settings (the rest are for measuring)."""
    from dataclasses import fields

    from engine.inversion.train import TrainConfig

    return {f.name for f in fields(TrainConfig)} - {"token", "property"} | {"model", "precision", "device",
                                                                           "prediction_type", "model_resolution"}


def handle_inspect(ctx) -> dict:
    """The vector inspector (engine.inversion.inspector): norms, cosines, nearest tokens; runs compared."""
    from engine.inversion.inspector import inspect_word
    from engine.store.library import Library

    p = ctx.params
    model = job_model(ctx, p)
    step = p.get("step")
    return inspect_word(model, Library(ctx.home), ctx.spec["concept"], run=p.get("run"),
                        step=None if step is None else int(step), top=int(p.get("top", 10)))


HANDLERS = {
    "train": handle_train,
    "sweep": handle_sweep,
    "generate": handle_generate,
    "eval": handle_eval,
    "experiment": handle_experiment,
    "inspect": handle_inspect,
}

