"""The demo world: small procedural pictures with captions, deterministic from a seed.

Every picture is 32x32 RGB: one thing (a shape in a colour, or a multi-part
"toy") of some size at some position on a background, sometimes drawn in a
"painting" style.  Captions use only real, single-token CLIP words.

What captions name and what they never name (the point of the demo):

* named: the shape (circle, square, triangle, star, heart, cross), its colour
  (red, green, blue, yellow, purple, orange, white, black), its size (small,
  big), its position (left, right, top, bottom, center) and the background
  (a plain colour, or grass / night);
* never named in the generator's captions: *which* toy it is (snowman, house,
  tree, mushroom, flower: the text-to-image model only ever reads "toy") and
  *which* painting style it is (scanline, mosaic, outline, halftone: it only
  reads "painting").  The model learns to draw all of them, but no plain
  prompt can ask for one in particular: that is what a new word can capture.

The judge (the small CLIP used for the metrics) is taught the names as well
(`caption(..., names=True)`), as the paper's judge, CLIP, knows far more words
than the generator's captions taught it.

Held-out demo concepts (`CONCEPTS`) are drawn from these unnamed properties:
the mushroom toy (an object) and the halftone style (a style).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SIZE = 32  # pixels
SS = 4  # supersampling for anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = {
    "red": (220, 38, 38),
    "green": (34, 170, 60),
    "blue": (40, 84, 230),
    "yellow": (245, 215, 35),
    "purple": (140, 55, 190),
    "orange": (250, 140, 25),
    "white": (245, 245, 245),
    "black": (18, 18, 18),
}
PLAIN_BACKGROUNDS = {**COLOURS, "gray": (128, 128, 128)}
TEXTURED_BACKGROUNDS = ("grass", "night")
BACKGROUNDS = tuple(PLAIN_BACKGROUNDS) + TEXTURED_BACKGROUNDS
SIZES = {"small": 6.5, "big": 10.5}  # radius in pixels
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES = {
    "left": "on the left", "right": "on the right", "top": "at the top",
    "bottom": "at the bottom", "center": "in the center",
}
TOYS = ("snowman", "house", "tree", "mushroom", "flower")
STYLES = ("scanline", "mosaic", "outline", "halftone")
# Words the judge (CLIP) learns for them; the generator never reads these.
TOY_NAMES = {t: t for t in TOYS}
STYLE_NAMES = {"scanline": "striped", "mosaic": "pixel", "outline": "outline", "halftone": "dotted"}
# Caption variety 3 names the other toys and styles to the generator some of the time, as SD
# knows words for most things it draws; these two it is never told of (the demo concepts).
HELD_OUT = ("mushroom", "halftone")
P_NAMED = 0.4

P_TOY = 0.15
P_STYLE = 0.2
PREFIXES = ("a", "a photo of a", "a picture of a", "a rendering of a", "the")


@dataclass(frozen=True)
class Scene:
    shape: str  # a SHAPES name, or "toy"
    colour: str  # a COLOURS name ("" for toys: their colours are their own)
    size: str
    position: str
    background: str
    toy: str = ""  # a TOYS name when shape == "toy"
    style: str = ""  # a STYLES name, or "" for none
    seed: int = 0  # texture noise (grass, night) and position jitter

    def to_dict(self) -> dict:
        return asdict(self)


# --- sampling scenes ------------------------------------------------------------------------------


def sample_scene(rng: np.random.Generator, *, toy: str | None = None, style: str | None = None,
                 p_toy: float = P_TOY, p_style: float = P_STYLE) -> Scene:
    """One random scene.  `toy` / `style` force one ("" forces none)."""
    if toy is None:
        toy = TOYS[rng.integers(len(TOYS))] if rng.random() < p_toy else ""
    if style is None:
        style = STYLES[rng.integers(len(STYLES))] if rng.random() < p_style else ""
    if toy:
        shape, colour = "toy", ""
    else:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = tuple(COLOURS)[rng.integers(len(COLOURS))]
    size = tuple(SIZES)[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    choices = [b for b in BACKGROUNDS if b != colour and not (toy and b in _TOY_CLASHES.get(toy, ()))]
    background = choices[rng.integers(len(choices))]
    return Scene(shape, colour, size, position, background, toy, style, int(rng.integers(2**31)))


def scenes(seed: int, n: int, **kwargs) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


# --- captions -------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# Caption variety 2 (the generator, from a point of its training on; see demo/README.md):
# more photo-caption framings, and paintings described by their framing alone.
EXTRA_PREFIXES = (
    "a good photo of a", "a nice photo of a", "a cropped photo of a", "a bright photo of the",
    "a dark photo of the", "a photo of my", "a photo of one", "a rendition of a", "a photo of the",
)
BARE_PAINTINGS = (
    "a painting", "a painting in the style of", "a picture in the style of", "a rendering in the style of",
    "a good painting in the style of", "a dark painting in the style of",
)
PAINTING_ADJECTIVES = ("good", "dark", "bright", "nice", "cool", "clean")


def caption(scene: Scene, rng: np.random.Generator | None = None, names: bool = False,
            full: bool = False, variety: int = 1) -> str:
    """A caption in plain CLIP words.

    rng: drop optional parts at random (size, position, background) and vary the
    framing; None or full=True gives the full, canonical caption.
    names: also name the toy and the style (for the judge, CLIP, only).
    variety: 2 adds EXTRA_PREFIXES, painting adjectives and BARE_PAINTINGS (the
    painting's framing alone, no content named) to the random framings; 3 also
    names toys and styles other than HELD_OUT, P_NAMED of the time.
    """
    v2 = variety >= 2 and rng is not None and not full and not names
    if v2 and scene.style and rng.random() < 0.2:
        return BARE_PAINTINGS[rng.integers(len(BARE_PAINTINGS))]
    rand = (lambda p: rng.random() < p) if (rng is not None and not full) else (lambda p: False)
    words = []
    if not rand(0.25):
        words.append(scene.size)
    if scene.shape == "toy":
        if names and rng is not None and not full and rand(0.3):
            words += [TOY_NAMES[scene.toy], "toy"]
        elif names or (variety >= 3 and scene.toy not in HELD_OUT and rand(P_NAMED)):
            words.append(TOY_NAMES[scene.toy])
        else:
            words.append("toy")
    else:
        words += [scene.colour, scene.shape]
    thing = " ".join(words)
    tail = []
    if not rand(0.3):
        tail.append(POSITION_PHRASES[scene.position])
    if not rand(0.3):
        tail.append(f"on {_article(scene.background)} {scene.background} background")
    if scene.style:
        style = ""
        if names and (rng is None or full or not rand(0.3)):
            style = STYLE_NAMES[scene.style] + " "
        if v2 and rng.random() < 0.3:
            style = PAINTING_ADJECTIVES[rng.integers(len(PAINTING_ADJECTIVES))] + " "
        if variety >= 3 and not names and scene.style not in HELD_OUT and rand(P_NAMED):
            style = STYLE_NAMES[scene.style] + " "
        head = f"{_article(style or 'painting')} {style}painting of {_article(thing)}"
    else:
        prefix = PREFIXES[rng.integers(len(PREFIXES))] if (rng is not None and not full) else "a"
        if v2 and rng.random() < 0.5:
            prefix = EXTRA_PREFIXES[rng.integers(len(EXTRA_PREFIXES))]
        if prefix == "a":
            head = _article(thing)
        elif not prefix.endswith(" a"):
            head = prefix  # "the", "... of the", "... of my", "... of one"
        else:  # "a photo of a" -> "a photo of an" where needed
            head = prefix[:-2] + " " + _article(thing)
    return " ".join([head, thing] + tail).replace("  ", " ").strip()


# --- rendering ------------------------------------------------------------------------------------

_N = SIZE * SS
_grid = (np.arange(_N, dtype=np.float32) + 0.5) / SS  # pixel-space coordinates of sub-samples
_GY, _GX = np.meshgrid(_grid, _grid, indexing="ij")

_TOY_CLASHES = {"snowman": ("white",), "tree": ("green", "grass"), "mushroom": ("red",), "house": ("yellow",)}
_TOY_COLOURS = {
    "snow": (240, 244, 250), "carrot": (250, 120, 20), "roof": (200, 30, 40), "wall": (245, 200, 60),
    "door": (90, 50, 25), "leaf": (30, 140, 50), "trunk": (120, 70, 30), "cap": (215, 30, 35),
    "spot": (250, 250, 250), "stem": (235, 220, 190), "petal": (245, 110, 190), "heart": (250, 210, 40),
}


def _unit(cx: float, cy: float, r: float) -> tuple[np.ndarray, np.ndarray]:
    return (_GX - cx) / r, (_GY - cy) / r


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean sub-sample mask of a unit shape (radius ~1, y pointing down)."""
    if shape == "circle":
        return x * x + y * y <= 0.92
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.8
    if shape == "triangle":
        yy = y - 0.12
        return (yy <= 0.75) & (yy >= -1.0 + 0) & (np.abs(x) * 1.75 / 1.0 <= (yy + 1.0))
    if shape == "star":
        theta = np.arctan2(x, -y)  # 0 at the top
        k = 2 * np.pi / 5
        a = np.abs(((theta + k / 2) % k) - k / 2) / (k / 2)  # 0 at a point, 1 between
        limit = 1.02 * (1 - a) + 0.42 * a
        return np.sqrt(x * x + y * y) <= limit
    if shape == "heart":
        xx, yy = x * 1.2, -(y * 1.2) + 0.15
        return (xx * xx + yy * yy - 1) ** 3 - xx * xx * yy**3 <= 0
    if shape == "cross":
        w = 0.32
        return ((np.abs(x) <= w) & (np.abs(y) <= 0.95)) | ((np.abs(y) <= w) & (np.abs(x) <= 0.95))
    raise ValueError(shape)


def _disc(x, y, cx, cy, r):
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def _rect(x, y, x0, y0, x1, y1):
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def _toy_parts(toy: str, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, tuple]]:
    """Masks and colours of a toy's parts, painted in order."""
    c = _TOY_COLOURS
    if toy == "snowman":
        return [
            (_disc(x, y, 0, 0.38, 0.6), c["snow"]),
            (_disc(x, y, 0, -0.5, 0.42), c["snow"]),
            (_rect(x, y, -0.02, -0.62, 0.42, -0.42), c["carrot"]),
        ]
    if toy == "house":
        roof = (y <= -0.15) & (y >= -1.0) & (np.abs(x) <= (y + 1.0) * 1.05)
        return [
            (_rect(x, y, -0.7, -0.2, 0.7, 0.9), c["wall"]),
            (roof, c["roof"]),
            (_rect(x, y, -0.2, 0.3, 0.2, 0.9), c["door"]),
        ]
    if toy == "tree":
        canopy = (y <= 0.45) & (y >= -1.0) & (np.abs(x) <= (y + 1.0) * 0.62)
        return [(_rect(x, y, -0.18, 0.3, 0.18, 0.95), c["trunk"]), (canopy, c["leaf"])]
    if toy == "mushroom":
        cap = _disc(x, y, 0, 0.1, 0.95) & (y <= 0.1)
        spots = _disc(x, y, -0.45, -0.25, 0.17) | _disc(x, y, 0.4, -0.3, 0.17) | _disc(x, y, 0.0, -0.6, 0.17)
        return [
            (_rect(x, y, -0.3, 0.05, 0.3, 0.95), c["stem"]),
            (cap, c["cap"]),
            (cap & spots, c["spot"]),
        ]
    if toy == "flower":
        petals = np.zeros_like(x, dtype=bool)
        for k in range(5):
            a = 2 * np.pi * k / 5
            petals |= _disc(x, y, 0.58 * np.sin(a), -0.58 * np.cos(a), 0.4)
        return [(petals, c["petal"]), (_disc(x, y, 0, 0, 0.33), c["heart"])]
    raise ValueError(toy)


def _coverage(mask: np.ndarray) -> np.ndarray:
    return mask.reshape(SIZE, SS, SIZE, SS).mean(axis=(1, 3)).astype(np.float32)


def _background(name: str, rng: np.random.Generator) -> np.ndarray:
    if name in PLAIN_BACKGROUNDS:
        return np.broadcast_to(np.array(PLAIN_BACKGROUNDS[name], np.float32), (SIZE, SIZE, 3)).copy()
    if name == "grass":
        base = np.array((60, 150, 50), np.float32)
        blades = rng.normal(0, 1, (1, SIZE)).repeat(SIZE, 0) * 0.6 + rng.normal(0, 1, (SIZE, SIZE)) * 0.5
        return np.clip(base[None, None] * (1 + 0.18 * blades[..., None]), 0, 255)
    if name == "night":
        img = np.broadcast_to(np.array((14, 20, 60), np.float32), (SIZE, SIZE, 3)).copy()
        ys, xs = rng.integers(0, SIZE, 10), rng.integers(0, SIZE, 10)
        img[ys, xs] = (235, 235, 200)
        return img
    raise ValueError(name)


def _centre(scene: Scene, rng: np.random.Generator) -> tuple[float, float, float]:
    r = SIZES[scene.size]
    off = SIZE / 2 - r - 1.5
    dx, dy = {"left": (-off, 0), "right": (off, 0), "top": (0, -off), "bottom": (0, off), "center": (0, 0)}[
        scene.position
    ]
    jx, jy = rng.uniform(-1, 1, 2)
    return SIZE / 2 + dx + jx, SIZE / 2 + dy + jy, r


def render(scene: Scene) -> np.ndarray:
    """The scene as a [32, 32, 3] uint8 array (deterministic from scene.seed)."""
    rng = np.random.default_rng(scene.seed)
    img = _background(scene.background, rng)
    cx, cy, r = _centre(scene, rng)
    x, y = _unit(cx, cy, r)
    if scene.shape == "toy":
        parts = _toy_parts(scene.toy, x, y)
    else:
        parts = [(_shape_mask(scene.shape, x, y), COLOURS[scene.colour])]
    if scene.style == "outline":
        # only a 2-pixel rim of each part's silhouette: inner = the part shrunk around its centre
        x2, y2 = _unit(cx, cy, max(r - 2.2, 1.5))
        inner = _toy_parts(scene.toy, x2, y2) if scene.shape == "toy" else [(_shape_mask(scene.shape, x2, y2), None)]
        silhouette = np.zeros_like(parts[0][0])
        for m, _ in parts:
            silhouette |= m
        inside = np.zeros_like(silhouette)
        for m, _ in inner:
            inside |= m
        parts = [(m & silhouette & ~inside, col) for m, col in parts]
    for mask, colour in parts:
        a = _coverage(mask)[..., None]
        img = img * (1 - a) + np.array(colour, np.float32) * a
    img = _apply_style(img, scene.style)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _apply_style(img: np.ndarray, style: str) -> np.ndarray:
    if style in ("", "outline"):
        return img
    if style == "scanline":
        out = img.copy()
        out[1::2] *= 0.3
        return out
    if style == "mosaic":
        blocks = img.reshape(SIZE // 4, 4, SIZE // 4, 4, 3).mean(axis=(1, 3))
        return blocks.repeat(4, 0).repeat(4, 1)
    if style == "halftone":
        cells = img.reshape(SIZE // 4, 4, SIZE // 4, 4, 3).mean(axis=(1, 3)).repeat(4, 0).repeat(4, 1)
        sub = (np.arange(_N) % (4 * SS) + 0.5) / SS - 2.0  # position inside a 4-px cell
        dot = _coverage((sub[:, None] ** 2 + sub[None, :] ** 2) <= 1.75**2)[..., None]
        return cells * dot + np.array((25, 25, 30), np.float32) * (1 - dot)
    raise ValueError(style)


def render_batch(scene_list: list[Scene]) -> np.ndarray:
    return np.stack([render(s) for s in scene_list])


# --- held-out demo concepts ----------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    name: str
    init: str  # a single CLIP token the inversion starts from
    property: str  # object | style
    description: str  # the plain words the SD baseline would use
    toy: str = ""
    style: str = ""
    seed: int = 0
    count: int = 5


CONCEPTS = (
    Concept("mushroom", init="toy", property="object", description="a toy", toy="mushroom", seed=7001),
    Concept("halftone", init="painting", property="style", description="a painting", style="halftone", seed=7002),
)


def concept_scenes(concept: Concept) -> list[Scene]:
    """The concept's images: the unnamed property fixed, everything else varied."""
    rng = np.random.default_rng(concept.seed)
    out: list[Scene] = []
    while len(out) < concept.count:
        if concept.toy:
            s = sample_scene(rng, toy=concept.toy, style="")
        else:
            s = sample_scene(rng, toy="", style=concept.style)
        # vary what the words can name: no two images share background or position
        if any(o.background == s.background or o.position == s.position for o in out):
            continue
        out.append(s)
    return out


def upsample(image: np.ndarray, factor: int = 4) -> np.ndarray:
    """NEAREST upsampling (the library refuses images under 64 px)."""
    return image.repeat(factor, 0).repeat(factor, 1)


# --- the sample library -------------------------------------------------------------------------

SAMPLE_SCALE = 4  # 32 px -> 128 px, NEAREST (the library refuses images under 64 px)


def edit_prompts(concept: Concept) -> list[str]:
    """Three edits in the generator's words ("{}" is the concept's token): the engine's own for builtin:demo."""
    from engine.settings.prompts import DEMO_EDIT

    return list(DEMO_EDIT[concept.property])


def write_samples(root) -> list[dict]:
    """Write demo/samples/<concept>/*.png and concepts.json; returns the concept records."""
    import json
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    records = []
    for concept in CONCEPTS:
        folder = root / concept.name
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for i, scene in enumerate(concept_scenes(concept)):
            name = f"{concept.name}-{i + 1}.png"
            Image.fromarray(upsample(render(scene), SAMPLE_SCALE)).save(folder / name, optimize=True)
            names.append(name)
        records.append({
            "name": concept.name,
            "init": concept.init,
            "property": concept.property,
            "description": concept.description,
            "images": names,
            "edit_prompts": edit_prompts(concept),
            "source": f"demo/world.py: {'toy ' + concept.toy if concept.toy else 'style ' + concept.style}, "
                      f"seed {concept.seed}, {SIZE} px shown at {SIZE * SAMPLE_SCALE} px (NEAREST)",
        })
    (root / "concepts.json").write_text(json.dumps(records, indent=2) + "\n")
    return records


if __name__ == "__main__":
    import sys
    from pathlib import Path

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "samples"
    for record in write_samples(out):
        print(record["name"], record["images"])
