"""One run's settings, and the checks every front end shares.

Torch-free on purpose: the CLI and the studio validate a run here, with the very
code the engine runs, before they submit it, so a bad value fails at once with
exit 2 and leaves nothing in the library.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields

from engine.errors import UserError
from engine.settings.data import checks as data_checks
from engine.settings.stopping import checks as stopping_checks

LR_SCHEDULES = ("constant", "warmup", "cosine")
COMPILE_MODES = ("off", "default", "reduce-overhead")
REGULARIZERS = ("none", "init-l2", "norm", "directional")
WEIGHTED = ("init-l2", "norm")  # the methods with a strength (--reg-weight, or METHOD:WEIGHT)
INIT_MODES = ("token", "cross")  # where a word starts: its initializer's input row, or (cross) its encoder output
CROSS_WEIGHT = 1e-5  # Pang et al.'s L2 pull toward the cross-initialised start (their code's default)
# A method of a sweep or of `experiment regularize`: parts joined by "+", e.g. "cross+per-layer"
# (engine.settings.train.parse_method): a regulariser, and/or cross (its strength: cross:W), per-layer.
METHOD_PARTS = (*REGULARIZERS, "cross", "per-layer")
MAX_VECTORS = 16  # a word of more slots than this eats the 75-token prompt


@dataclass
class TrainConfig:
    """One run's settings.  Defaults are the study's (lr 5e-4, batch 1, AdamW, one vector)."""

    token: str
    init: str
    property: str = "object"
    steps: int = 2000
    lr: float = 5e-4
    batch_size: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step: effective batch = batch_size * grad_accum
    weight_decay: float = 1e-2
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    seed: int = 0
    vectors: int = 1  # token slots the word expands to (the paper: 1)
    init_from: str | None = None  # start from an existing embedding: a file, or NAME@RUN:STEP
    regularize: str = "none"  # none | init-l2 | norm | directional (keeping the word editable)
    reg_weight: float = 0.0  # lambda for init-l2 and norm (0: the method's default)
    init_mode: str = "token"  # token: the initializer's rows; cross: their text-encoder output (Pang et al.)
    cross_weight: float = CROSS_WEIGHT  # cross: loss += w * mean |v - v_cross| (not squared; 0: no pull)
    per_layer: bool = False  # P+ / XTI: a vector set per UNet cross-attention layer (SD 1.x/2.x)
    save_every: int = 500
    keep_checkpoints: int | None = None  # keep the newest N resumable checkpoints (None: all)
    preview_every: int = 500
    preview_prompt: str | None = None
    preview_steps: int = 25
    preview_seed: int = 0
    log_every: int = 10
    resolution: int | None = None  # None: the model's own
    center_crop: bool = False
    flip_p: float = 0.5
    templates: list[str] | None = None  # custom prompt templates with "{}" for the token ({caption}: the image's)
    masked_loss: bool = False  # the images' masks weight the loss per latent pixel (engine.settings.data)
    buckets: bool = False  # each image at the bucket nearest its aspect ratio, not squashed or cropped square
    ema: float | None = None  # the saved word is a moving average of the vectors with this decay
    low_vram: bool = False  # gradient checkpointing through the UNet: less memory, ~2x slower
    compile: str = "off"  # off | default | reduce-overhead (CUDA graphs): torch.compile the UNet
    deterministic: bool = False  # torch's deterministic algorithms: bit for bit on CUDA too, slower
    fixed_timestep: int | None = None  # tests: overfit one timestep
    fixed_noise: bool = False  # tests: one fixed noise sample
    # Knowing when the word is learned (engine.settings.stopping, engine.inversion.monitor):
    probe_every: int = 500  # measure reconstruction/editability every N steps (0: off); SD's row once at the start
    probe_images: int = 4  # probe images for the neutral prompt
    probe_edit_images: int = 1  # probe images per edit prompt
    probe_steps: int = 10  # a probe image's sampling steps (Table 1's 25 would cost ~12% of a run, 10 ~6%)
    dloss_every: int = 25  # the training objective on one fixed batch every N steps (0: off)
    stop_when: str | None = None  # plateau[:STEPS], recon:X, diverged (comma-separated); None: run every step
    best_by: str = "tradeoff"  # tradeoff | recon | edit | balanced: which probed step is the run's best

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def as_dict(self) -> dict:
        return asdict(self)

    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def validate(self) -> None:
        """Raise UserError naming the first bad setting (by its CLI option) and a good value."""
        for ok, message in self._checks():
            if not ok:
                raise UserError(message)

    def _checks(self):
        yield _whole(self.steps, 1), "--steps must be a whole number of at least 1, e.g. 2000"
        yield _positive(self.lr), "--lr must be a positive number, e.g. 5e-4"
        yield _whole(self.batch_size, 1), "--batch-size must be a whole number of at least 1"
        yield _whole(self.grad_accum, 1), "--grad-accum must be a whole number of at least 1"
        yield _finite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay must be 0 or a positive number"
        yield self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}"
        yield _whole(self.warmup_steps, 0), "--warmup-steps must be 0 or a positive whole number"
        yield isinstance(self.seed, int) and not isinstance(self.seed, bool), "--seed must be a whole number"
        yield (_whole(self.vectors, 1) and self.vectors <= MAX_VECTORS,
               f"--vectors must be a whole number from 1 to {MAX_VECTORS}")
        yield self.regularize in REGULARIZERS, f"--regularize must be one of {', '.join(REGULARIZERS)}"
        yield _finite(self.reg_weight) and self.reg_weight >= 0, "--reg-weight must be 0 or a positive number"
        yield from self._word_checks()
        yield _whole(self.save_every, 1), "--save-every must be a whole number of at least 1"
        yield (self.keep_checkpoints is None or _whole(self.keep_checkpoints, 1),
               "--keep-checkpoints must be a whole number of at least 1 (the latest is always kept)")
        yield _whole(self.preview_every, 0), "--preview-every must be 0 (off) or a positive whole number"
        yield _whole(self.preview_steps, 1), "--preview-steps must be at least 1"
        yield _whole(self.log_every, 1), "--log-every must be at least 1"
        yield (self.resolution is None or (_whole(self.resolution, 8) and self.resolution % 8 == 0),
               "--resolution must be a multiple of 8, e.g. 512")
        yield _finite(self.flip_p) and 0.0 <= self.flip_p <= 1.0, "--flip must be between 0 and 1"
        yield self.compile in COMPILE_MODES, f"--compile must be one of {', '.join(COMPILE_MODES)}"
        yield (isinstance(self.deterministic, bool),
               "--deterministic is on or off: give the flag, or true/false in the settings file")
        yield (self.templates is None or (len(self.templates) > 0 and all(
            isinstance(t, str) and t.count("{}") == 1 for t in self.templates)),
            "each prompt template (--templates) must contain exactly one {} where the token goes")
        yield from data_checks(self)
        yield from stopping_checks(self)

    def _word_checks(self):
        """Cross-initialisation and per-layer words (engine.inversion.cross_init, engine.sd.per_layer)."""
        yield self.init_mode in INIT_MODES, f"--init-mode must be one of {', '.join(INIT_MODES)}"
        yield (_finite(self.cross_weight) and self.cross_weight >= 0,
               f"--cross-weight must be 0 (no pull) or a positive number, e.g. {CROSS_WEIGHT:g}")
        yield (not (self.init_mode == "cross" and self.init_from),
               "--init-mode cross starts from the initializer's encoder output, --init-from from a file: drop one")
        yield isinstance(self.per_layer, bool), "--per-layer is on or off: give the flag, or true/false"
        yield (not (self.per_layer and self.compile != "off"),
               "--per-layer hooks every cross-attention layer, which --compile does not follow; drop --compile")

    def lr_at(self, step: int) -> float:
        warm = self.warmup_steps if self.lr_schedule in ("warmup", "cosine") else 0
        if step < warm:
            return self.lr * (step + 1) / warm
        if self.lr_schedule == "cosine":
            progress = (step - warm) / max(1, self.steps - warm)
            return self.lr * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr


# Job params that are not TrainConfig fields: where and how the run executes.
RUNTIME_PARAMS = ("model", "prediction_type", "model_resolution", "precision", "device", "seeds", "inits",
                  "regularizes")


def config_from_params(params: dict, concept, strict: bool = True) -> TrainConfig:
    """A run's TrainConfig from job params, filling token, init and property from the concept.
    strict: a key that is no setting is an error (a new request); else it is ignored (an old record)."""
    settings = {k: v for k, v in params.items() if k not in RUNTIME_PARAMS}
    settings.setdefault("token", concept.token)
    settings["init"] = settings.get("init") or concept.init
    settings.setdefault("property", concept.property)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown and strict:
        raise UserError(f"unknown training setting(s) {', '.join(unknown)}; see `tistudio train --help`")
    return TrainConfig(**{k: v for k, v in settings.items() if k in known})


SWEEP_KEYS = ("seeds", "inits", "regularizes")  # each a list: one member per combination


def parse_method(entry: str) -> dict:
    """A method of a sweep (--regularize, `experiment regularize --methods`) as the settings it
    sets.  Parts joined by "+": at most one regulariser, METHOD or METHOD:WEIGHT ("init-l2:0.003";
    no strength: --reg-weight, or the method's default), "cross" or "cross:W" (cross-initialisation,
    its pull W), "per-layer".  A method names no regulariser: none.  Examples: "none",
    "init-l2:0.01", "cross", "cross+per-layer", "directional+per-layer"."""
    settings: dict = {"regularize": "none"}
    parts = [p.strip() for p in str(entry).split("+")]
    named = [p.partition(":")[0] for p in parts]
    if len([n for n in named if n in REGULARIZERS]) > 1 or len(set(named)) != len(named):
        raise UserError(f"{entry!r}: join different parts with '+', at most one regulariser, e.g. cross+per-layer")
    for part, name in zip(parts, named):
        _, colon, weight = part.partition(":")
        if name not in METHOD_PARTS:
            raise UserError(f"unknown regulariser {name!r}; choose from {', '.join(METHOD_PARTS)} "
                            "(parts joined with '+')")
        if colon and name not in (*WEIGHTED, "cross"):
            raise UserError(f"{name} takes no strength; give one only to {', '.join(WEIGHTED)} or cross, "
                            "e.g. init-l2:0.003")
        value = _strength(entry, weight) if colon else None
        if name == "per-layer":
            settings["per_layer"] = True
        elif name == "cross":
            settings["init_mode"] = "cross"
            settings.update({"cross_weight": value} if value is not None else {})
        else:
            settings["regularize"] = name
            settings.update({"reg_weight": value} if value is not None else {})
    return settings


def _strength(entry: str, weight: str) -> float:
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{entry!r}: the strength after ':' must be a positive number, e.g. init-l2:0.003")
    return value


def method_label(settings: dict) -> str:
    """A member's method as `parse_method` reads it back: "none", "init-l2:0.01", "cross+per-layer"."""
    parts = []
    reg = settings.get("regularize") or "none"
    if reg != "none" or not (settings.get("init_mode") == "cross" or settings.get("per_layer")):
        weight = settings.get("reg_weight") or 0
        parts.append(f"{reg}:{weight:g}" if weight and reg in WEIGHTED else reg)
    if settings.get("init_mode") == "cross":
        weight = settings.get("cross_weight", CROSS_WEIGHT)
        parts.append("cross" if weight == CROSS_WEIGHT else f"cross:{weight:g}")
    if settings.get("per_layer"):
        parts.append("per-layer")
    return "+".join(parts)


def sweep_members(params: dict) -> list[dict]:
    """One params dict per run a job trains (a plain run is a sweep of one): the cartesian
    product of `seeds` x `inits` x `regularizes` over the shared settings.  A method entry
    (`parse_method`) sets that member's regulariser and strength, and turns on cross-initialisation
    or per-layer words where it names them (the shared settings' stand otherwise)."""
    base = {k: v for k, v in params.items() if k not in SWEEP_KEYS}
    seeds = params.get("seeds") or [base.get("seed", 0)]
    inits = params.get("inits") or [base.get("init")]
    methods = [parse_method(m) for m in (params.get("regularizes") or [base.get("regularize", "none")])]
    return [{**base, "seed": int(s), "init": i, **m} for s, i, m in itertools.product(seeds, inits, methods)]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x) -> bool:
    return _finite(x) and x > 0


def _whole(x, least: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= least
