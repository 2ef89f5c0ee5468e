"""The torch.compile'd UNet a warm model keeps between jobs: at most one, freed when replaced.

What torch.compile makes outlives the wrapper it returns: dynamo caches the compiled code on
the UNet's forward, and mode "reduce-overhead" records CUDA graphs whose memory pool lives as
long as that code.  A warm worker that compiled again for every sweep size (K runs change the
batch) would pile graphs and pools up until dynamo's recompile limit sends it back to eager.
So a model holds one compiled UNet, for one (mode, batch, resolution, low_vram); a job that
wants another frees it first (`torch._dynamo.reset()`: every compiled product, and the
CUDA-graph trees with their pools when CUDA is up), and a model leaving the worker takes it
with it (`release_compiled`).  A job that asks for the same again skips the warm-up.
`engine status` shows what is held (`compiled_held`).
"""

from __future__ import annotations

import torch

_HELD = "_compiled"  # the model's attribute: (what it was compiled for, the compiled UNet)


def compiled_unet(model, mode: str, *, batch: int, resolution: int, low_vram: bool = False):
    """The UNet to train with: the plain one for mode "off", else the model's compiled UNet for
    this mode and input shape, compiled now (after freeing any other) when it has none."""
    if mode == "off":
        return model.unet
    key = {"mode": mode, "batch": int(batch), "resolution": int(resolution), "low_vram": bool(low_vram)}
    held = model.__dict__.get(_HELD)
    if held is not None and held[0] == key:
        return held[1]
    release_compiled(model)
    compiled = torch.compile(model.unet, mode=None if mode == "default" else mode)
    model.__dict__[_HELD] = (key, compiled)
    return compiled


def release_compiled(model) -> bool:
    """Free the model's compiled UNet and what torch.compile made for it; whether there was one."""
    held = model.__dict__.pop(_HELD, None)
    if held is None:
        return False
    del held
    torch._dynamo.reset()  # the code cache, guards and (CUDA up) the CUDA-graph trees and their pools
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return True


def compiled_held(model) -> dict | None:
    """What the model's compiled UNet was compiled for ({"mode", "batch", "resolution",
    "low_vram"}), or None."""
    held = model.__dict__.get(_HELD)
    return dict(held[0]) if held is not None else None
