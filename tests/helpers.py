"""Test data made on the fly (no downloads)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from PIL import Image

# The engine's test job kinds (sleep, echo, fail, crash …): set $TISTUDIO_EXTRA_HANDLERS to this.
TEST_HANDLERS = str(Path(__file__).with_name("engine_test_handlers.py"))


def make_images(folder: Path, count: int = 3, size: int = 80, seed: int = 0) -> Path:
    """`count` small RGB PNGs with a coloured square on noise: distinct and valid."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(count):
        pixels = (rng.rand(size, size, 3) * 80).astype("uint8")
        pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rng.randint(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


# a forked worker has the zygote's argv (the suite's shared zygote names no test's home: its
# workers are known by their folder, which is their engine's home)
ENGINE_PROCESSES = (b"engine.server.main", b"engine.worker.main", b"engine.server.zygote")


def engine_pids(home: Path, which: tuple[bytes, ...] = ENGINE_PROCESSES) -> list[int]:
    """Live engine processes serving `home` or a home inside it (its path is unique to the test)."""
    import os

    from engine.store.runs import pid_alive

    found = []
    prefix = os.fsencode(str(home))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            forked_here = (entry / "comm").read_bytes().strip() == b"tistudio-worker" \
                and os.fsencode(os.readlink(entry / "cwd")).startswith(prefix)
        except OSError:
            continue
        ours = forked_here or any(arg.startswith(prefix) for arg in argv)
        if ours and any(w in argv for w in which) and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill_engines(home: Path) -> None:
    import contextlib
    import os
    import signal

    for pid in engine_pids(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def recomputed_scores(images_dir: Path, train_images: list[Path], prompts: list[str], clip_name: str = "builtin:tiny"):
    """Table 1's numbers recomputed from the images an evaluation saved under `images_dir`
    (reconstruction/*.png, edit-1/*.png …) with the judge it names: (reconstruction, editability,
    editability per image).  A score test checks the engine's numbers against these."""
    from PIL import Image

    from engine.inversion.judge import load_clip
    from engine.inversion.metrics import editability_paper, editability_per_image, reconstruction
    from engine.settings.prompts import without_placeholder

    clip = load_clip(clip_name)

    def embs(folder: Path):
        return clip.images([Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))])

    train = clip.images([Image.open(p).convert("RGB") for p in train_images])
    texts = clip.texts([without_placeholder(p) for p in prompts])
    sets = [embs(images_dir / f"edit-{i}") for i in range(1, len(prompts) + 1)]
    return (reconstruction(embs(images_dir / "reconstruction"), train), editability_paper(sets, texts),
            editability_per_image(sets, texts))


@contextlib.contextmanager
def scratch_engine_home():
    """A short home under /tmp (Unix socket paths are limited to ~108 bytes) whose engine
    processes are all killed, and the folder removed, when its user is done, whatever happened."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="tis-"))
    try:
        yield path
    finally:
        kill_engines(path)
        shutil.rmtree(path, ignore_errors=True)
