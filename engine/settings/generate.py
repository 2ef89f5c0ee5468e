"""What a generation job asks for, and its checks: torch-free, so the CLI and the studio
refuse a bad request with the engine's own code before submitting it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UserError
from engine.settings.samplers import DEFAULT_SAMPLER, get_sampler

MODES = ("ti", "sd", "compare")


@dataclass
class GenerateRequest:
    prompt: str
    negative: str = ""
    n: int = 1
    seed: int = 0  # images use seeds seed, seed+1, ...
    steps: int = 25
    guidance: float = 7.5
    mode: str = "ti"  # ti | sd | compare
    uses: list[str] = field(default_factory=list)
    out_dir: Path | None = None  # default <home>/outputs/<timestamp>-<slug>/
    resolution: int | None = None  # a square size; default: the model's
    batch_size: int | None = None  # images sampled at once; None: engine.sd.generation.default_batch
    sampler: str = DEFAULT_SAMPLER
    width: int | None = None  # default: resolution, else the model's
    height: int | None = None

    @classmethod
    def from_params(cls, p: dict) -> "GenerateRequest":
        """The request a generate job's params describe (the CLI, the studio and the worker agree)."""
        try:
            return cls(
                prompt=p.get("prompt") or "", negative=p.get("negative") or "", n=int(p.get("n", 1)),
                seed=int(p.get("seed", 0)), steps=int(p.get("steps", 25)), guidance=float(p.get("guidance", 7.5)),
                mode=p.get("mode", "ti"), uses=list(p.get("uses") or []),
                out_dir=Path(p["out_dir"]) if p.get("out_dir") else None, resolution=_size(p.get("resolution")),
                batch_size=_size(p.get("batch_size")), sampler=p.get("sampler") or DEFAULT_SAMPLER,
                width=_size(p.get("width")), height=_size(p.get("height")),
            )
        except (TypeError, ValueError) as exc:
            raise UserError(f"generation settings are not numbers where numbers belong ({exc})") from None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    def validate(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise UserError("the prompt is empty; write what to draw, with your concept's token in it")
        checks = [
            (self.mode in MODES, f"mode {self.mode!r} is not one of {', '.join(MODES)}"),
            (self.n >= 1, "-n must be at least 1"),
            (self.seed >= 0, "--seed must be 0 or more"),
            (self.steps >= 1, "--steps must be at least 1"),
            (self.batch_size is None or self.batch_size >= 1, "--batch-size must be at least 1"),
            (math.isfinite(self.guidance) and self.guidance >= 0, "--guidance must be 0 or more"),
        ]
        for option, size in (("--resolution", self.resolution), ("--width", self.width), ("--height", self.height)):
            ok = size is None or (size >= 8 and size % 8 == 0)
            checks.append((ok, f"{option} must be a multiple of 8, e.g. 512"))
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        get_sampler(self.sampler)


def _size(value) -> int | None:
    """A whole number of pixels or images, or None (the default) when not given."""
    return None if value in (None, "") else int(value)
