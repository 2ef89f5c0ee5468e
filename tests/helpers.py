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


def engine_pids(home: Path) -> list[int]:
    """Live engine processes (server or worker) serving `home`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"engine.server" in a or b"engine.worker" in a for a in argv) and str(home).encode() in argv:
            found.append(int(entry.name))
    return found


def kill_engines(home: Path) -> None:
    import contextlib
    import os
    import signal

    for pid in engine_pids(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
