"""Training data: prompt templates, image preprocessing and the latent cache.

The latent cache is the main speed trick of the fast path: every training
image is encoded by the VAE once per flip (not once per step, as the diffusers
example does) and we keep the latent distribution's mean and std, so each step
still samples a fresh latent exactly as the reference does, for free.

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
from PIL import Image

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


def preprocess(image: Image.Image, resolution: int, center_crop: bool = False) -> torch.Tensor:
    """RGB PIL image -> [3, R, R] float tensor in [-1, 1] (bicubic, like the reference)."""
    image = image.convert("RGB")
    if center_crop:
        left, top, side = _center_square(image)
        image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def size_conditioning(image: Image.Image, resolution: int, center_crop: bool = False) -> list[float]:
    """SDXL's add_time_ids for one image: (orig h, orig w, crop top, crop left, target h, target w).

    As diffusers' textual_inversion_sdxl.py: the source image's size, and the crop
    offset in target pixels (0, 0 when the whole image is resized)."""
    top = left = 0
    if center_crop:
        crop_left, crop_top, side = _center_square(image)
        top, left = round(crop_top * resolution / side), round(crop_left * resolution / side)
    return [image.height, image.width, top, left, resolution, resolution]


@dataclass
class LatentCache:
    """Per image and flip: the VAE posterior's mean and std, [N, 2, C, h, w]; per image its
    size conditioning, [N, 6] (SDXL's add_time_ids)."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    micro: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return self.mean.shape[0]

    def sample(self, index: torch.Tensor, flip: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A scaled latent drawn from the cached posterior, as `latent_dist.sample()` would."""
        mean = self.mean[index, flip]
        std = self.std[index, flip]
        return (mean + std * noise) * self.scaling_factor


@torch.no_grad()
def encode_images(vae, images: list[Image.Image], resolution: int, center_crop: bool = False,
                  plan: VaePlan | None = None) -> LatentCache:
    """Encode every image and its mirror once; keep the posterior (not a sample).

    `plan.encode_chunk` images at a time (engine.sd.vae: from the free memory; default 8), in
    tiles when it says so.  An fp16 VAE whose config says `force_upcast` (SDXL's) encodes in
    fp32 and is cast back afterwards, whatever happens: fp16 -> fp32 -> fp16 is exact, so the
    shared VAE ends bit for bit as it was."""
    pixels = torch.stack([preprocess(im, resolution, center_crop) for im in images])
    pixels = torch.stack([pixels, pixels.flip(-1)], dim=1)  # [N, 2, 3, R, R]
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
        micro=torch.tensor([size_conditioning(im, resolution, center_crop) for im in images], dtype=torch.float32),
    )


def load_images(paths: list[Path]) -> list[Image.Image]:
    from engine.store.images import load_image

    return [load_image(p) for p in paths]
