"""Test data made on the fly (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, count: int = 3, size: int = 80, seed: int = 0) -> Path:
    """`count` small RGB PNGs with a coloured square on noise: distinct and valid."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(count):
        pixels = (rng.rand(size, size, 3) * 80).astype("uint8")
        pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rng.randint(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder
