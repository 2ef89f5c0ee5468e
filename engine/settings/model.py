"""What qualifies a model spec where the weights cannot say: its prediction type and its resolution.

An SD 2.x single-file checkpoint is either the 768-px v-prediction model or a 512-px epsilon
one (2.x-base and its fine-tunes), and nothing in the weights tells them apart
(engine.sd.models guesses as diffusers does).  These two settings travel with the spec they
qualify, wherever it goes:

    the command line   --prediction-type epsilon|v_prediction   --model-resolution 512
    the environment    $TISTUDIO_PREDICTION_TYPE                 $TISTUDIO_MODEL_RESOLUTION
    the config file    prediction_type = "epsilon"               model_resolution = 512   (top level, next to model)
    job params         "prediction_type"                         "model_resolution"

(`--model-resolution`, not `--resolution`: train and generate already have a --resolution, the
size a job works at.)  Torch-free: the CLI, the studio and the engine's door check them here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from engine.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")
MODEL_ENV = "TISTUDIO_MODEL"
PREDICTION_ENV = "TISTUDIO_PREDICTION_TYPE"
RESOLUTION_ENV = "TISTUDIO_MODEL_RESOLUTION"
PARAMS = ("prediction_type", "model_resolution")  # the job params, beside "model"


@dataclass(frozen=True)
class ModelOptions:
    """The qualifiers of one model spec (None: the model's own, or the guess)."""

    prediction_type: str | None = None
    resolution: int | None = None

    @classmethod
    def from_params(cls, params: Mapping) -> "ModelOptions":
        """From a job's params (UserError for a bad value, naming the option)."""
        return cls(prediction_type(params.get("prediction_type"), "--prediction-type"),
                   resolution(params.get("model_resolution"), "--model-resolution"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "ModelOptions":
        return cls(prediction_type(env.get(PREDICTION_ENV) or None, f"${PREDICTION_ENV}"),
                   resolution(env.get(RESOLUTION_ENV) or None, f"${RESOLUTION_ENV}"))

    def params(self) -> dict:
        """The job params for these options: only the ones that are set."""
        found = {"prediction_type": self.prediction_type, "model_resolution": self.resolution}
        return {k: v for k, v in found.items() if v is not None}

    def env(self) -> dict[str, str]:
        found = {PREDICTION_ENV: self.prediction_type, RESOLUTION_ENV: self.resolution}
        return {k: str(v) for k, v in found.items() if v is not None}


def model_params(env: Mapping[str, str] = os.environ) -> dict:
    """The job params that name the model, as a client sends them: the spec ($TISTUDIO_MODEL, else
    None: the engine's default) and its qualifiers when they are set."""
    return {"model": env.get(MODEL_ENV) or None, **ModelOptions.from_env(env).params()}


def prediction_type(value, source: str) -> str | None:
    """`value` checked (None stays None); `source` names where it came from, for the message."""
    if value is None:
        return None
    if value not in PREDICTION_TYPES:
        raise UserError(f"{source} {value!r} is not a prediction type; give epsilon (SD 1.x, 2.x-base at 512 px) "
                        "or v_prediction (SD 2.x at 768 px)")
    return value


def resolution(value, source: str) -> int | None:
    """A model's resolution in pixels: a whole multiple of 8 of at least 64 (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 64 or value % 8:
        raise UserError(f"{source} {value!r} is not a resolution; give the model's size in pixels, "
                        "a multiple of 8 (e.g. 512 or 768)")
    return value
