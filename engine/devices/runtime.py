"""Device, dtype and memory figures.  The only place that asks torch about hardware."""

from __future__ import annotations

import os

import torch

from engine.errors import UserError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def pick_device(requested: str | None = None) -> torch.device:
    """--device / $TISTUDIO_DEVICE, else CUDA when present, else CPU.

    A bare `cuda` means the worker's own GPU when $TISTUDIO_DEVICE names one (the engine
    gives each worker its device there, engine.devices.pool), and a CUDA device picked becomes
    torch's current one, so library code that says "cuda" (or frees "the" cache) uses it
    rather than opening a context on GPU 0."""
    own = os.environ.get("TISTUDIO_DEVICE")
    name = requested or own or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and own and own.startswith("cuda:"):
        name = own
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} asked for but only {torch.cuda.device_count()} CUDA device(s) "
                            "are visible; use cuda:0 … or check CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(device)
    return device


def frozen_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype of the frozen weights: fp16 on CUDA (bf16 on request), fp32 on CPU."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or (device.type == "cpu" and precision == "auto"):
        return torch.float32
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU does not support bf16; use --precision fp16")
        return torch.bfloat16
    if device.type == "cpu":
        # Half-precision convolutions on CPU are slow or missing; fp32 is the honest choice.
        return torch.float32
    return torch.float16


def reset_peak_memory(device: torch.device | str) -> None:
    """Start `vram_peak` (memory_figures) afresh: the allocator's peak counts from the process's
    start otherwise, so a warm worker's second job would report its first job's peak.  A
    no-op on a CPU, and before CUDA has started (nothing to reset; and starting CUDA here
    would cost a torch-free job its context)."""
    if str(device).startswith("cuda") and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def memory_figures(device: torch.device) -> dict:
    """VRAM in bytes (allocated, reserved, peak since the job began, device total); empty on CPU."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "vram_allocated": torch.cuda.memory_allocated(device),
        "vram_reserved": torch.cuda.memory_reserved(device),
        "vram_peak": torch.cuda.max_memory_allocated(device),
        "vram_total": total,
        "vram_used_device": total - free,
    }


def free_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on a CUDA device: the device's free memory plus what
    torch's allocator holds unused (reserved, not allocated).  None on a CPU: no limit worth
    modelling there (engine.sd.vae keeps its sizes)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def device_info(device: torch.device | None = None) -> dict:
    device = device or pick_device()
    info = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info.update(memory_figures(device))
    return info
