"""The sample concept the studio offers on first start: a small patterned toy robot.

The pictures are drawn here, procedurally, with Pillow (no downloads, no
borrowed images) and shipped in `tistudio/samples/robot/`.  `python -m
tistudio.samples` redraws them.

On the first start with an empty library the studio adds them as the concept
"sample" (token <sample>, initializer "toy", an object), ready to train.
"""

from __future__ import annotations

import os
from pathlib import Path

SAMPLE_NAME = "sample"
SAMPLE_INIT = "toy"
SAMPLE_DESCRIPTION = "a small toy robot"
SAMPLE_DIR = Path(__file__).parent / "samples" / "robot"
SIZE = 128
MARKER = ".sample-offered"  # in the data home: the sample is offered once per home

# (background, floor, scale, x offset, y offset, tilt in degrees)
_SCENES = [
    ((88, 128, 196), (150, 110, 70), 1.00, 0, 0, 0),
    ((236, 224, 200), (120, 120, 120), 0.80, -18, 6, -8),
    ((120, 186, 120), (70, 120, 60), 0.90, 16, 2, 6),
    ((40, 40, 64), (90, 70, 110), 0.70, 10, 14, 0),
    ((250, 200, 120), (180, 90, 60), 1.05, -6, 6, 10),
]


def _robot(scale: float):
    """The toy on a transparent canvas: teal head, yellow antenna ball, a red/white
    checkerboard belly, stubby orange arms and grey feet."""
    from PIL import Image, ImageDraw

    s = int(SIZE * 2)  # draw at 2x, downsample for smooth edges
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    c = s // 2
    u = s * scale / 16  # one "unit"
    def box(x0, y0, x1, y1):
        return [c + x0 * u, c + y0 * u, c + x1 * u, c + y1 * u]
    # antenna
    d.line([c, c - 6.5 * u, c, c - 4.5 * u], fill=(60, 60, 60), width=max(2, int(u / 2)))
    d.ellipse(box(-0.9, -7.6, 0.9, -5.8), fill=(250, 210, 40), outline=(120, 90, 0), width=2)
    # head with two eyes
    d.rounded_rectangle(box(-3, -4.8, 3, -1.2), radius=u, fill=(40, 170, 170), outline=(20, 80, 80), width=3)
    for ex in (-1.4, 1.4):
        d.ellipse(box(ex - 0.6, -3.6, ex + 0.6, -2.4), fill=(255, 255, 255))
        d.ellipse(box(ex - 0.25, -3.25, ex + 0.25, -2.75), fill=(0, 0, 0))
    # arms
    d.rounded_rectangle(box(-5.6, -0.6, -4, 3.2), radius=u / 2, fill=(240, 130, 40), outline=(120, 60, 10), width=2)
    d.rounded_rectangle(box(4, -0.6, 5.6, 3.2), radius=u / 2, fill=(240, 130, 40), outline=(120, 60, 10), width=2)
    # body: a checkerboard belly, 4 x 4 squares
    d.rectangle(box(-4, -1, 4, 5), fill=(40, 170, 170), outline=(20, 80, 80), width=3)
    for i in range(4):
        for j in range(3):
            colour = (220, 40, 40) if (i + j) % 2 == 0 else (250, 250, 250)
            d.rectangle(box(-3 + 1.5 * i, -0.2 + 1.6 * j, -1.5 + 1.5 * i, 1.4 + 1.6 * j), fill=colour)
    # feet
    d.rectangle(box(-3.4, 5, -1, 6.6), fill=(110, 110, 120))
    d.rectangle(box(1, 5, 3.4, 6.6), fill=(110, 110, 120))
    return img


def _scene(background, floor, scale, dx, dy, tilt):
    from PIL import Image, ImageDraw

    s = SIZE * 2
    img = Image.new("RGBA", (s, s), background + (255,))
    d = ImageDraw.Draw(img)
    horizon = int(s * 0.72)
    d.rectangle([0, horizon, s, s], fill=floor + (255,))
    for k in range(0, s, 16):  # a few floor lines, so each scene has some texture
        d.line([k, horizon, k - (s // 2 - k) // 3, s], fill=tuple(max(0, v - 25) for v in floor) + (255,), width=2)
    robot = _robot(scale).rotate(tilt, resample=Image.BICUBIC)
    img.alpha_composite(robot, (int(dx * 2), int(dy * 2)))
    return img.convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)


def make_images(folder: os.PathLike | str) -> list[Path]:
    """Draw the sample pictures into `folder` (robot-1.png …); return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(_SCENES, start=1):
        path = folder / f"robot-{i}.png"
        _scene(*scene).save(path, format="PNG", optimize=True)
        paths.append(path)
    return paths


def sample_images() -> list[Path]:
    """The shipped pictures (drawn afresh into the package folder if they are missing)."""
    paths = sorted(SAMPLE_DIR.glob("robot-*.png"))
    if len(paths) != len(_SCENES):
        paths = make_images(SAMPLE_DIR)
    return paths


def _demo_samples_dir() -> Path:
    """demo/samples/ in a checkout; tistudio/demo_samples/ in an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "demo" / "samples", here / "demo_samples"):
        if candidate.is_dir():
            return candidate
    return here / "demo_samples"


DEMO_SAMPLES = _demo_samples_dir()


def _demo_concepts() -> list[dict]:
    """The demo world's held-out concepts (demo/samples/concepts.json), if shipped."""
    import json

    try:
        return json.loads((DEMO_SAMPLES / "concepts.json").read_text())
    except (OSError, ValueError):
        return []


def ensure_sample_concept(home: os.PathLike | str, tokenizer=None, model: str | None = None) -> str | None:
    """Add the sample concept to an empty library, once per data home (on builtin:demo,
    the demo world's held-out concepts instead).

    Returns the concept's name when it was added, else None.  Never raises for
    an ordinary failure (a read-only package folder, a clash): the studio opens anyway.
    """
    from engine.errors import UserError
    from engine.store.library import Library

    home = Path(home)
    marker = home / MARKER
    library = Library(home)
    if marker.exists() or library.list() or library.exists(SAMPLE_NAME):
        return None
    demo = _demo_concepts() if model == "builtin:demo" else []
    try:
        if demo:
            for c in demo:
                library.add(c["name"], DEMO_SAMPLES / c["name"], c["init"], property=c["property"],
                            description=c["description"], tokenizer=tokenizer)
            return demo[0]["name"]
        images = sample_images()
        library.add(SAMPLE_NAME, images[0].parent, SAMPLE_INIT, property="object",
                    description=SAMPLE_DESCRIPTION, tokenizer=tokenizer)
    except (UserError, OSError):
        return None
    finally:
        try:
            marker.write_text("the studio offered its sample concept here once\n")
        except OSError:
            pass
    return SAMPLE_NAME


if __name__ == "__main__":  # redraw the shipped pictures: python -m tistudio.samples
    for p in make_images(SAMPLE_DIR):
        print(p)
