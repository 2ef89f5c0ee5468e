"""A training step's random draws, sent to the device in one copy.

Every draw of a step (image, flip, template, timestep, noise) comes from the runs' own CPU
generators, so a resumed or batched run draws exactly what its solo run draws, on any device.
Sending each draw to a GPU on its own would make the host wait each time: a plain
`.to(device)` of ordinary (pageable) memory returns only when the copy is done, and indexing
a CUDA tensor with CPU indices copies the indices that way first.  So the draws are gathered
here into one flat buffer (pinned when the device is a GPU), the trainer sends it with one
non-blocking copy (`Inversion._upload`), and `unpack` takes it apart on the device, indices
included.
"""

from __future__ import annotations

import torch

# Integers travel as float32, exact below 2**24: indices into a handful of images and prompt
# templates, a flip bit and a timestep below num_train_timesteps (1000 for SD) all are.
EXACT_INTEGERS = 2**24


class Staging:
    """Host tensors collected for one upload; `add` gives each a number, `unpack` returns them
    on the device in their own shapes and dtypes (int64 or float32)."""

    def __init__(self):
        self._parts: list[torch.Tensor] = []

    def add(self, tensor: torch.Tensor) -> int:
        if tensor.dtype not in (torch.int64, torch.float32):
            raise TypeError(f"staging carries int64 and float32 tensors, not {tensor.dtype}")
        self._parts.append(tensor)
        return len(self._parts) - 1

    def pack(self, pin: bool) -> torch.Tensor:
        """Every part, flattened into one float32 buffer on the host (page-locked when `pin`,
        which a non-blocking copy to a GPU needs to be truly asynchronous)."""
        flat = [part.reshape(-1).float() for part in self._parts]
        buffer = torch.empty(sum(f.numel() for f in flat), dtype=torch.float32, pin_memory=pin)
        return torch.cat(flat, out=buffer)

    def unpack(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """The parts again, as views of (float32) or conversions from (int64) the uploaded buffer:
        everything happens where `buffer` lives, so nothing waits on the host."""
        parts, start = [], 0
        for part in self._parts:
            piece = buffer[start : start + part.numel()].view(part.shape)
            parts.append(piece.long() if part.dtype == torch.int64 else piece)
            start += part.numel()
        return parts
