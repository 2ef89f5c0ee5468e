"""Every job kind's params, and the one check each goes through before anything is written.

`check_job` is the engine's door: `Operations.submit` (and resume, with the merged params)
calls it, and so do the CLI and the studio before they submit, so a bad request gets the same
one line whichever client sent it, and leaves no run behind.  Torch-free and model-free: what
needs the model's tokenizer (an initializer of one token per vector) is checked by the clients
that have it loaded and by the worker.

A kind's params are its settings (a `TrainConfig`'s fields, a `GenerateRequest`'s …) plus
where it runs (`WHERE`).  A key that is none of them is refused: a typo must not train 2000
steps with the setting silently ignored.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Callable

from engine.errors import UserError
from engine.settings.generate import GenerateRequest
from engine.settings.model import ModelOptions
from engine.settings.train import RUNTIME_PARAMS, SWEEP_KEYS, TrainConfig, config_from_params, sweep_members

WHERE = tuple(k for k in RUNTIME_PARAMS if k not in SWEEP_KEYS)  # model, precision, device …
EXPERIMENTS = ("steps", "init", "seeds", "regularize", "synthesis")
SWEEP_EXPERIMENTS = {"init": "inits", "seeds": "seeds", "regularize": "regularizes"}  # kind -> the list it varies
MEASURING = ("run", "step", "images", "prompts_file", "clip", "clip_weights", "seed", "sample_steps", "guidance",
             "sample_batch_size", "dino")
EXTRA_KINDS_ENV = "TISTUDIO_EXTRA_HANDLERS"  # the test suite's own job kinds: unchecked


def check_job(kind: str | None, params: dict | None, concept=None, *, resumed: bool = False) -> None:
    """Raise UserError naming the first bad setting of a `kind` job with `params`, and a good value.
    `concept`: the library's concept the job is about (`engine.store.library.Concept`; the caller
    looks it up, see `about_a_concept`), or None when it is about none or is not at hand.
    `resumed`: the params come from an earlier record merged with new ones (keys an older version
    wrote pass; their values are still checked)."""
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise UserError("job params must be a JSON object")
    check = CHECKS.get(kind or "")
    if check is None:
        if os.environ.get(EXTRA_KINDS_ENV):
            return
        raise UserError(f"no job kind {kind!r}; the engine runs {', '.join(CHECKS)}")
    _check_device(params.get("device"))
    ModelOptions.from_params(params)  # --prediction-type, --model-resolution
    check(params, concept, resumed)


def about_a_concept(kind: str | None, concept) -> bool:
    """Whether a `kind` job names the concept it is about (True), or none (False); refuses the
    wrong one.  Kinds this module does not know (the test suite's) take what they are given."""
    if kind not in CHECKS:
        return concept is not None
    if kind not in CONCEPT_KINDS:
        if concept is not None:
            raise UserError(f"a {kind} job is about no one concept; leave the concept out")
        return False
    if not isinstance(concept, str) or not concept:
        raise UserError(f"a {kind} job needs the name of the concept it is about")
    return True


# --- per kind -------------------------------------------------------------------------------------


def _train(params: dict, concept, resumed: bool) -> None:
    members = sweep_members(params)
    if len(members) > 1:
        raise UserError("a train job is one run; give several seeds, inits or regularisers as a sweep job")
    _train_members(members, concept, resumed)


def _sweep(params: dict, concept, resumed: bool) -> None:
    _lists(params, SWEEP_KEYS)
    _train_members(sweep_members(params), concept, resumed)


def _train_members(members: list[dict], concept, resumed: bool) -> None:
    _needs_images(concept)
    for member in members:
        config = config_from_params({k: v for k, v in member.items() if k not in WHERE}, concept or _Unknown(),
                                    strict=not resumed)
        config.validate()


def _generate(params: dict, concept, resumed: bool) -> None:
    known = {f.name for f in fields(GenerateRequest)}
    _known_keys(params, known | set(WHERE), "generation", resumed)
    GenerateRequest.from_params(params).validate()


def _eval(params: dict, concept, resumed: bool) -> None:
    _known_keys(params, set(MEASURING) | set(WHERE), "evaluation", resumed)
    _needs_images(concept)
    _measuring(params)


def _experiment(params: dict, concept, resumed: bool) -> None:
    kind = params.get("kind")
    if kind not in EXPERIMENTS:
        raise UserError(f"unknown experiment {kind!r}; choose {', '.join(EXPERIMENTS)}")
    train_keys = {f.name for f in fields(TrainConfig)} - {"token", "property"}
    known = {"kind", "values", "prompts", "at", *MEASURING, *WHERE, *train_keys}
    if kind == "regularize":
        known.add("seeds")  # every method at each of these training seeds
    _known_keys(params, known, f"{kind} experiment", resumed)
    _measuring(params)
    for key in ("values", "prompts", "at", "seeds"):
        if params.get(key) is not None and not isinstance(params[key], list):
            raise UserError(f"the experiment's {key} must be a list")
    if kind in SWEEP_EXPERIMENTS:
        _needs_images(concept)
        settings = {k: v for k, v in params.items() if k in train_keys}
        values = params.get("values") or []
        seeds = {"seeds": params["seeds"]} if kind == "regularize" and params.get("seeds") else {}
        _train_members(sweep_members({**settings, SWEEP_EXPERIMENTS[kind]: values, **seeds}), concept, resumed)
    elif kind == "steps":
        _needs_images(concept)


def _inspect(params: dict, concept, resumed: bool) -> None:
    _known_keys(params, {"run", "step", "top", *WHERE}, "inspection", resumed)
    _saved_step(params.get("step"))
    _whole(params.get("top", 10), 1, "--top")


CHECKS: dict[str, Callable[[dict, object, bool], None]] = {
    "train": _train, "sweep": _sweep, "generate": _generate, "eval": _eval, "experiment": _experiment,
    "inspect": _inspect,
}
CONCEPT_KINDS = ("train", "sweep", "eval", "experiment", "inspect")  # jobs about one concept


# --- the pieces ---------------------------------------------------------------------------------


class _Unknown:
    """Stands for the concept when only the settings are checked (no library at hand)."""

    token, init, property, images = "<word>", "word", "object", [Path("image")]


def _needs_images(concept) -> None:
    if concept is not None and not concept.images:
        raise UserError(f"concept {concept.name!r} has no training images; add some with "
                        f"`tistudio concept images add {concept.name} FILE...`")


def _known_keys(params: dict, known: set[str], what: str, resumed: bool) -> None:
    unknown = sorted(set(params) - known)
    if unknown and not resumed:
        raise UserError(f"unknown {what} setting(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(known))}")


def _measuring(params: dict) -> None:
    """What evaluation and the experiments measure with: images per set, sampling, the judge."""
    _whole(params.get("images", 16), 1, "--images")
    _saved_step(params.get("step"))
    _whole(params.get("seed", 0), 0, "--seed")
    _whole(params.get("sample_steps", 25), 1, "--sample-steps")
    _whole(params.get("sample_batch_size"), 1, "--sample-batch", optional=True)
    guidance = params.get("guidance", 7.5)
    if not (_number(guidance) and guidance >= 0):
        raise UserError("--guidance must be 0 or a positive number, e.g. 7.5")
    for key in ("run", "clip", "clip_weights", "prompts_file"):
        if params.get(key) is not None and not isinstance(params[key], str):
            raise UserError(f"{key} must be text")


def _check_device(device) -> None:
    if device is None or device == "":
        return
    if not isinstance(device, str) or not (device in ("cpu", "mps", "cuda") or _cuda_index(device)):
        raise UserError(f"--device {device!r} is not a device; give cpu, cuda or cuda:N")


def _cuda_index(device: str) -> bool:
    return device.startswith("cuda:") and device[5:].isdigit()


def _lists(params: dict, keys) -> None:
    for key in keys:
        if params.get(key) is not None and not isinstance(params[key], list):
            raise UserError(f"{key} must be a list, e.g. [1, 2, 3]")


def _saved_step(value) -> None:
    """--step: a saved step's number, `best` (the run's best probed step), or none (the final embedding)."""
    if value != "best":  # engine.store.words.BEST (the store is a layer this one does not import)
        _whole(value, 0, "--step", optional=True)


def _whole(value, least: int, option: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
        raise UserError(f"{option} must be a whole number of at least {least}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
