"""Aspect-ratio buckets (`--buckets`): each image trained at the size nearest its shape, at the
model's pixel area, instead of squashed or cropped square.  kohya sd-scripts' rules
(`model_util.make_bucket_resolutions`, `BucketManager.select_bucket`,
`trim_and_resize_if_required`):

* the sizes: every width from half the resolution to twice it in steps, each with the tallest
  height (in steps) whose area stays within resolution², and the square (kohya at 512 px:
  256 to 1024 in steps of 64);
* an image goes to the size with the nearest aspect ratio (ties: the first, sizes sorted);
* it is scaled to cover that size and the excess is cropped, centred.

The step: 64 px on SD 1.x, 2.x and SDXL (kohya's default), and on a smaller model (the
builtin tiny ones, builtin:demo's 32 px) its own size unit: the VAE's factor times the UNet's
downsampling, the smallest step at which every size still divides into whole latents through
the UNet (4 px for builtin:tiny, 8 for builtin:demo; on SD 1.x it is 64 as well).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import UserError

KOHYA_STEP = 64  # px: kohya's default bucket step (bucket_reso_steps)
FULL_SIZE = 512  # px: a model trained at this resolution or more gets kohya's step


@dataclass(frozen=True)
class Fit:
    """How one image fits its bucket: scaled to `resized` (covering it), then `crop`ped, centred."""

    bucket: tuple[int, int]  # (width, height)
    resized: tuple[int, int]
    crop: tuple[int, int]  # (left, top) in resized pixels

    @property
    def box(self) -> tuple[int, int, int, int]:
        left, top = self.crop
        return left, top, left + self.bucket[0], top + self.bucket[1]


def size_unit(vae_config, unet_config) -> int:
    """The model's size unit in pixels: the VAE's factor times the UNet's downsampling."""
    vae = 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)
    unet = 2 ** (len(unet_config.get("down_block_types", [0])) - 1)
    return vae * unet


def bucket_step(unit: int, resolution: int) -> int:
    """kohya's 64 px on models trained at 512 px or more (a multiple of their unit), else the unit."""
    if resolution >= FULL_SIZE and KOHYA_STEP % unit == 0:
        return KOHYA_STEP
    return unit


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """Every (width, height) of the model's pixel area, sorted; UserError when it makes no buckets."""
    if resolution % step:
        raise UserError(f"--buckets needs a resolution in steps of {step} px on this model, not {resolution}; "
                        f"give --resolution {max(step, resolution // step * step)}")
    area, low, high = resolution * resolution, max(step, resolution // 2 // step * step), 2 * resolution
    sizes = {(resolution, resolution)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            sizes |= {(width, height), (height, width)}
    if len(sizes) < 3:
        raise UserError(f"--buckets: at {resolution} px in steps of {step} px this model has no sizes but the "
                        "square; train without --buckets (or at a larger --resolution)")
    return sorted(sizes)


def fit(width: int, height: int, sizes: list[tuple[int, int]]) -> Fit:
    """The bucket nearest the image's aspect ratio, and how the image covers it (kohya's rounding)."""
    ratio = width / height
    bucket = min(sizes, key=lambda s: abs(s[0] / s[1] - ratio))  # min keeps the first of equals
    bw, bh = bucket
    scale = bh / height if ratio > bw / bh else bw / width
    resized = (max(bw, int(width * scale + 0.5)), max(bh, int(height * scale + 0.5)))
    return Fit(bucket, resized, ((resized[0] - bw) // 2, (resized[1] - bh) // 2))


def model_step(model) -> int:
    """A loaded model's bucket step at its training resolution (from its VAE's and UNet's configs)."""
    return bucket_step(size_unit(model.vae.config, model.unet.config), model.info.resolution)


def info_step(info) -> int:
    """The bucket step of a model known by its configs only (engine.sd.models.ModelInfo): for
    the CLI's check before a run is submitted.  64 px when the configs cannot be read (every
    full-size family's step)."""
    import json
    from pathlib import Path

    from engine.sd.models import CONFIGS

    root = CONFIGS / info.config if info.config else Path(info.location)
    try:
        vae, unet = (json.loads((root / part / "config.json").read_text()) for part in ("vae", "unet"))
    except (OSError, ValueError):
        return KOHYA_STEP
    return bucket_step(size_unit(vae, unet), info.resolution)
