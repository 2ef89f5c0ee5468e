"""Training data: prompt templates, image preprocessing and the latent cache.

The latent cache is the main speed trick of the fast path: every training
image is encoded by the VAE once per flip (not once per step, as the diffusers
example does) and we keep the latent distribution's mean and std, so each step
still samples a fresh latent exactly as the reference does, for free.

With `--buckets` each image is placed in its bucket (engine.inversion.buckets: scaled to cover
it, the excess cropped, centred) instead of squashed or cropped square, and the caller keeps
one cache per bucket.  With masks, the cache keeps each image's mask brought down to the
latent grid by area averaging, as kohya does (`weights`).

It also keeps each image's SDXL size conditioning (`add_time_ids`: original
height and width, crop top and left, target height and width), which SD 1.x/2.x
simply do not read.  SDXL's VAE overflows in fp16 (its config says
`force_upcast`), so the cache is then encoded with the VAE in fp32, once, as many images at a
time as the free memory allows (engine.sd.vae).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.inversion.buckets import Fit
from engine.sd.vae import ENCODE_CHUNK, VaePlan, vae_kept, working_dtype

# The prompt templates of the original Textual Inversion code (and diffusers' example).
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}",
    "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a good painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


def templates_for(prop: str) -> tuple[str, ...]:
    return STYLE_TEMPLATES if prop == "style" else OBJECT_TEMPLATES


def default_preview_prompt(prop: str, token: str) -> str:
    return templates_for(prop)[0].format(token)


def _center_square(image: Image.Image) -> tuple[int, int, int]:
    """(left, top, side) of the largest centred square."""
    side = min(image.size)
    return (image.width - side) // 2, (image.height - side) // 2, side


def _placed(image: Image.Image, resolution: int, center_crop: bool, fit: Fit | None) -> Image.Image:
    """The image (or its mask) as it is trained: in its bucket, else square (cropped or squashed)."""
    if fit is not None:
        return image.resize(fit.resized, Image.Resampling.BICUBIC).crop(fit.box)
    if center_crop:
        left, top, side = _center_square(image)
        image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC)


def preprocess(image: Image.Image, resolution: int, center_crop: bool = False, fit: Fit | None = None) -> torch.Tensor:
    """RGB PIL image -> [3, R, R] float tensor in [-1, 1] (bicubic, like the reference); with
    `fit`, [3, height, width] of its bucket."""
    image = _placed(image.convert("RGB"), resolution, center_crop, fit)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def mask_weights(mask: Image.Image | None, latent_size: tuple[int, int], resolution: int,
                 center_crop: bool = False, fit: Fit | None = None) -> torch.Tensor:
    """An image's mask as loss weights on the latent grid, [1, h, w] in [0, 1]: placed as the
    image is, then brought down by area averaging (kohya: `F.interpolate(mode="area")`).  No
    mask: ones (the image counts whole)."""
    if mask is None:
        return torch.ones((1, *latent_size))
    pixels = np.asarray(_placed(mask.convert("L"), resolution, center_crop, fit), dtype=np.float32) / 255.0
    return F.interpolate(torch.from_numpy(pixels)[None, None], size=latent_size, mode="area")[0]


def size_conditioning(image: Image.Image, resolution: int, center_crop: bool = False,
                      fit: Fit | None = None) -> list[float]:
    """SDXL's add_time_ids for one image: (orig h, orig w, crop top, crop left, target h, target w).

    As diffusers' textual_inversion_sdxl.py: the source image's size, and the crop
    offset in target pixels (0, 0 when the whole image is resized); in a bucket, the bucket's
    size and the crop of its excess (kohya's SDXL conditioning)."""
    if fit is not None:
        return [image.height, image.width, fit.crop[1], fit.crop[0], fit.bucket[1], fit.bucket[0]]
    top = left = 0
    if center_crop:
        crop_left, crop_top, side = _center_square(image)
        top, left = round(crop_top * resolution / side), round(crop_left * resolution / side)
    return [image.height, image.width, top, left, resolution, resolution]


@dataclass
class LatentCache:
    """Per image and flip: the VAE posterior's mean and std, [N, 2, C, h, w]; per image its
    size conditioning, [N, 6] (SDXL's add_time_ids); with masks, per image and flip its loss
    weights on the latent grid, [N, 2, 1, h, w]."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    micro: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return self.mean.shape[0]

    def sample(self, index: torch.Tensor, flip: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A scaled latent drawn from the cached posterior, as `latent_dist.sample()` would."""
        mean = self.mean[index, flip]
        std = self.std[index, flip]
        return (mean + std * noise) * self.scaling_factor

    def weights(self, index: torch.Tensor, flip: torch.Tensor) -> torch.Tensor | None:
        """The drawn images' loss weights (mirrored with them), or None without masks."""
        return None if self.masks is None else self.masks[index, flip]

    def keep_masks(self, masks: list[torch.Tensor]) -> None:
        """Keep the images' masks ([1, h, w] each, `mask_weights`) and their mirrors, where the latents are."""
        stacked = torch.stack(masks)
        self.masks = torch.stack([stacked, stacked.flip(-1)], dim=1).to(self.mean.device)


@torch.no_grad()
def encode_images(vae, images: list[Image.Image], resolution: int, center_crop: bool = False,
                  plan: VaePlan | None = None, fits: list[Fit] | None = None) -> LatentCache:
    """Encode every image and its mirror once; keep the posterior (not a sample).  `fits`:
    one bucket's images, each placed in it (all of one size).

    `plan.encode_chunk` images at a time (engine.sd.vae: from the free memory; default 8), in
    tiles when it says so.  An fp16 VAE whose config says `force_upcast` (SDXL's) encodes in
    fp32 and is cast back afterwards, whatever happens: fp16 -> fp32 -> fp16 is exact, so the
    shared VAE ends bit for bit as it was."""
    fits = fits or [None] * len(images)
    pixels = torch.stack([preprocess(im, resolution, center_crop, f) for im, f in zip(images, fits)])
    pixels = torch.stack([pixels, pixels.flip(-1)], dim=1)  # [N, 2, 3, H, W]
    means, stds = [], []
    with vae_kept(vae, plan, encoding=True):
        vae.to(working_dtype(vae))
        flat = pixels.flatten(0, 1).to(vae.device, vae.dtype)
        for chunk in flat.split(plan.encode_chunk if plan else ENCODE_CHUNK):
            dist = vae.encode(chunk).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    shape = (len(images), 2) + means[0].shape[1:]
    return LatentCache(
        mean=torch.cat(means).reshape(shape),
        std=torch.cat(stds).reshape(shape),
        scaling_factor=float(vae.config.scaling_factor),
        micro=torch.tensor([size_conditioning(im, resolution, center_crop, f) for im, f in zip(images, fits)],
                           dtype=torch.float32),
    )


def load_images(paths: list[Path]) -> list[Image.Image]:
    from engine.store.images import load_image

    return [load_image(p) for p in paths]
