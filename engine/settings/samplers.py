"""The samplers generation offers, by the names users know them by.

Each is a diffusers scheduler built from the model's own noise schedule (its
`scheduler_config`), so a v-prediction model stays v-prediction.  The label is what
A1111 writes in a PNG's `parameters` ("Sampler: Euler a"), so other tools read it.
Torch-free: the CLI and the studio list and check names without loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import UserError


@dataclass(frozen=True)
class Sampler:
    name: str  # what --sampler takes
    label: str  # A1111's name, written into the PNG
    scheduler: str  # the diffusers class
    options: dict = field(default_factory=dict)  # keyword arguments for from_config

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.scheduler}({args})"


SAMPLERS = {s.name: s for s in (
    Sampler("dpm++2m", "DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    Sampler("dpm++2m-karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    Sampler("euler-a", "Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("euler", "Euler", "EulerDiscreteScheduler"),
    Sampler("ddim", "DDIM", "DDIMScheduler"),
    Sampler("pndm", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
)}
DEFAULT_SAMPLER = "dpm++2m"
_ALIASES = {"dpm++": "dpm++2m", "dpmpp2m": "dpm++2m", "euler_a": "euler-a", "eulera": "euler-a", "plms": "pndm"}


def get_sampler(name: str | None) -> Sampler:
    """The sampler called `name` (None: the default); UserError listing the choices otherwise."""
    key = (name or DEFAULT_SAMPLER).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)} with --sampler")
    return SAMPLERS[key]


def make_scheduler(name: str | None, base_config):
    """A fresh diffusers scheduler for sampler `name`, from the model's scheduler config."""
    import diffusers

    sampler = get_sampler(name)
    return getattr(diffusers, sampler.scheduler).from_config(base_config, **sampler.options)
