"""The VAE around our calls: how many images it takes at once, and its state kept whatever happens.

Memory.  The VAE's activations grow with the pixels, and at SDXL's 1024 px in fp32 (its VAE
overflows in fp16, so it is upcast) one image needs about 3 GiB to encode and 4 GiB to decode.
A latent cache encoded 8 at a time, or 4 generated images decoded at once, then runs a 24 GB
card out of memory.  `plan_vae` chooses from the resolution, the VAE's dtype and the free
memory how many images to encode at once, whether to decode a batch one image at a time
(diffusers' slicing) and, when even one image does not fit, in tiles (diffusers' tiling).
On a CPU no limit is worth modelling: today's sizes stay, and images stay bit for bit.

State.  diffusers' SDXL pipeline upcasts an fp16 VAE to fp32 for the decode and casts it back
with no try/finally: an error in between (an OOM) leaves the warm worker's VAE in fp32, and
every later SDXL generation and preview then fails on a dtype mismatch.  `vae_kept` puts the
dtype, slicing and tiling back in our own `finally` around every call that may decode.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

# Peak live activations per image pixel (elements) of the released VAE layout -- block_out_channels
# 128, 256, 512, 512, which SD 1.x, SD 2.x and SDXL share, so the family does not change them:
#   encode 640 = five 128-channel tensors at full resolution (the first down block's resnets);
#   decode 768 = three 256-channel tensors at full resolution (the last upsampler's output, then
#                the last up block's first resnet).
# Measured by bench/vae_activations.py: it counts the bytes of the tensors every aten op leaves
# alive while that VAE encodes and decodes 1 and 2 images at 256, 512 and 1024 px (on meta tensors,
# so 1024 px costs nothing): exactly linear in images x pixels, 2560 and 3072 bytes a pixel in fp32.
# tests/test_vae_plan.py measures it again.  The CPU's peak RSS was 1.0x that for encode and
# 1.25-1.3x for decode (512-640 px: kernels' workspaces, the allocator); HEADROOM covers it.  The
# bench variant sdxl-vae-memory prints the peak CUDA measures beside this estimate.
ENCODE_ELEMENTS_PER_PIXEL = 640
DECODE_ELEMENTS_PER_PIXEL = 768
HEADROOM = 1.3
USABLE = 0.85  # of the free memory: the rest for fragmentation and whatever else is alive then
ENCODE_CHUNK = 8  # images encoded at once when memory does not limit it (and always on a CPU)
MIN_TILE = 128  # the smallest tile side (pixels) tiling goes down to


@dataclass(frozen=True)
class VaePlan:
    """How the VAE encodes and decodes at one size, and what that was chosen from."""

    encode_chunk: int  # images encoded at once (a training run's latent cache)
    batch: int  # images sampled at once
    decode_batch: int  # images decoded at once: the batch, or 1 with slicing
    slicing: bool  # diffusers' vae.enable_slicing(): a batch decodes one image at a time
    tiling: bool  # diffusers' vae.enable_tiling(): even one image does not fit; tiles of `tile` px
    tile: int | None
    free_bytes: int | None  # the free memory it was planned for; None: not limited (a CPU)
    encode_bytes: int  # the estimated peak of encoding one image, headroom included
    decode_bytes: int  # the same for decoding one image

    def describe(self) -> dict:
        """All of it, for a training run's header event."""
        return asdict(self)

    def decoding(self) -> dict:
        """How an image was decoded, for its record (what changes its pixels' last bits)."""
        return {"decode_batch": self.decode_batch, "slicing": self.slicing, "tiling": self.tiling, "tile": self.tile}


def activation_bytes(width: int, height: int, dtype_bytes: int) -> tuple[int, int]:
    """(encode, decode): the estimated peak bytes of one image at this size, headroom included."""
    pixels = width * height
    return (math.ceil(ENCODE_ELEMENTS_PER_PIXEL * pixels * dtype_bytes * HEADROOM),
            math.ceil(DECODE_ELEMENTS_PER_PIXEL * pixels * dtype_bytes * HEADROOM))


def plan_vae(width: int, height: int, dtype_bytes: int, free_bytes: int | None, batch: int) -> VaePlan:
    """Chunk, decode batch and slicing/tiling for `batch` images of width x height, the VAE working
    in `dtype_bytes` (4 for SDXL's upcast VAE), with `free_bytes` free (None: no limit, today's sizes).

    A pure function: the free memory comes from the caller (engine.devices.runtime.free_memory)."""
    encode, decode = activation_bytes(width, height, dtype_bytes)
    if free_bytes is None:
        return VaePlan(ENCODE_CHUNK, batch, batch, False, False, None, None, encode, decode)
    budget = int(free_bytes * USABLE)
    chunk = max(1, min(ENCODE_CHUNK, budget // encode))
    slicing = batch > 1 and batch * decode > budget  # a batch that does not fit decodes image by image
    tile = _tile_side(budget, dtype_bytes) if max(encode, decode) > budget else None
    return VaePlan(chunk, batch, 1 if slicing else batch, slicing, tile is not None, tile, free_bytes, encode,
                   decode)


def _tile_side(budget: int, dtype_bytes: int) -> int:
    """The largest tile side (a multiple of 64 px, at least MIN_TILE) whose decode fits `budget`."""
    per_pixel = DECODE_ELEMENTS_PER_PIXEL * dtype_bytes * HEADROOM
    return max(MIN_TILE, int(math.sqrt(budget / per_pixel)) // 64 * 64)


# --- on a loaded model --------------------------------------------------------------------------


def working_dtype(vae):
    """The dtype the VAE encodes and decodes in: fp32 for an fp16 VAE whose config says
    `force_upcast` (SDXL's: it overflows in fp16), as diffusers' SDXL pipeline does."""
    import torch

    if vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False)):
        return torch.float32
    return vae.dtype


def plan_for(model, width: int, height: int, batch: int) -> VaePlan:
    """`plan_vae` for this model's VAE on its device, with the memory free now."""
    from engine.devices.runtime import free_memory

    dtype_bytes = working_dtype(model.vae).itemsize
    return plan_vae(width, height, dtype_bytes, free_memory(model.device), batch)


@contextlib.contextmanager
def vae_kept(vae, plan: VaePlan | None = None, *, encoding: bool = False):
    """Run VAE work with `plan`'s slicing (decoding only: encoding chunks itself) and tiling; after
    it, whatever happened inside, the VAE has its dtype, slicing and tiling as before."""
    saved = _state(vae)
    try:
        if plan is not None:
            vae.use_slicing = plan.slicing and not encoding
            if plan.tiling:
                vae.use_tiling = True
                vae.tile_sample_min_size = plan.tile
                vae.tile_latent_min_size = plan.tile // 2 ** (len(vae.config.block_out_channels) - 1)
        yield
    finally:
        _restore(vae, saved)


def _state(vae) -> dict:
    names = ("use_slicing", "use_tiling", "tile_sample_min_size", "tile_latent_min_size")
    return {"dtype": vae.dtype, **{name: getattr(vae, name) for name in names if hasattr(vae, name)}}


def _restore(vae, saved: dict) -> None:
    dtype = saved.pop("dtype")
    # Every parameter, not just vae.dtype (the first one's): an OOM inside `.to()` leaves a mix.
    if any(p.dtype != dtype for p in vae.parameters()):
        vae.to(dtype)
    for name, value in saved.items():
        setattr(vae, name, value)
