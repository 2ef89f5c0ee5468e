"""A1111's embedding card: a picture of the word that carries its embedding, twice.

For years AUTOMATIC1111's web UI shared embeddings as PNG "cards": a preview picture with
the word's name drawn on it, whose file holds the embedding two ways, so that a site which
strips text chunks still leaves a copy.

* a ``tEXt`` chunk ``sd-ti-embedding``: base64 of the JSON of the embedding's dict, every
  tensor written as ``{"TORCHTENSOR": nested lists of floats}``;
* the pixels: the same JSON, zlib-compressed, split into low and high nibbles, each half an
  RGB block as tall as the picture, pasted left and right of it behind one black column.
  A block's low nibbles are the data XORed with a fixed key stream (a linear congruential
  generator: a = 1664525, c = 1013904223, m = 2^32, each value % 255, low nibble); its high
  nibbles are only a dotted pattern, shaded by the word's first vector.  A reader crops the
  black border, masks the low nibbles, takes the first and last all-zero columns as the two
  separators, unscrambles both blocks and inflates their bytes.

A1111 writes cards only for SD 1.x/2.x (its pixel writer reads ``string_to_param`` for the
dots and fails on SDXL's dict).  We write SDXL cards too, as ``{"clip_l", "clip_g"}``, the
dict A1111's loader reads from any file, with the dots shaded by clip_l's first vector: its
reader never looks at the dots.

This module knows the card's encoding and drawing; it works on numpy arrays and PIL
images (no torch).  engine.sd.formats reads cards (the chunk, else the pixels, as A1111
does); `tistudio export --format a1111-png` writes them with `write_card`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from engine.errors import UserError
from engine.store.paths import atomic_path

CHUNK = "sd-ti-embedding"
A1111_TOKEN_ID = 265  # CLIP's id for "*": what A1111 writes in string_to_token and ignores on load
CARD_SIZE = 512  # the picture's side: A1111's cards are SD 1.x previews, 512 px
SDXL_KEYS = ("clip_l", "clip_g")

# A1111's key stream: seed_{i+1} = (a * seed_i + c) mod m from seed 0; each value is seed % 255.
_LCG_A, _LCG_C, _LCG_M = 1664525, 1013904223, 2**32
_EDGE_VALUES = 1024  # the dots are shaded by at most this many of the first vector's values
# The hidden JSON of the largest embedding (75 x 4096 floats) is about 6 MiB: refuse to inflate more.
_MAX_HIDDEN_BYTES = 64 * 1024 * 1024
_PREVIEW = re.compile(r"^step-(\d+)\.png$")


# --------------------------------------------------------------------------- the embedding's dict


def payload(blocks, token: str, step: int | None = None, model_name: str | None = None) -> dict:
    """The dict a card carries, tensors as A1111's JSON writes them.

    One block (SD 1.x/2.x): A1111's own `.pt` dict.  Two (SDXL): only ``clip_l`` and ``clip_g``,
    because A1111's loader casts every value of an SDXL dict to a tensor."""
    blocks = [np.asarray(b, dtype=np.float32) for b in blocks]
    if len(blocks) == 2:
        return {key: _tensor(block) for key, block in zip(SDXL_KEYS, blocks)}
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": _tensor(blocks[0])},
        "name": token,
        "step": int(step) if step is not None else None,
        "sd_checkpoint": None,
        "sd_checkpoint_name": model_name,
    }


def _tensor(block: np.ndarray) -> dict:
    # float32 -> Python float (a float64 holding the same value): A1111 reads it back as float64
    # and casts to float32, which gives the same bits.
    return {"TORCHTENSOR": block.astype(np.float64).tolist()}


def chunk_text(data: dict) -> str:
    """The ``sd-ti-embedding`` chunk's text: base64 of the dict's JSON."""
    return base64.b64encode(json.dumps(data).encode()).decode("ascii")


# --------------------------------------------------------------------------- the pixels' copy


def key_stream(n: int) -> np.ndarray:
    """The first `n` values of A1111's LCG (each `seed % 255`), as uint8.

    Computed in doubling chunks: s[i + k] = a^k s[i] + c_k (mod 2^32), so a large card costs a
    few numpy operations rather than one Python step per byte."""
    seeds = np.empty(max(n, 1), dtype=np.uint64)
    seeds[0] = _LCG_C % _LCG_M  # the first value comes after one step from seed 0
    filled, mul, add = 1, _LCG_A, _LCG_C  # (mul, add): the map s -> mul*s + add that jumps `filled` steps
    while filled < n:
        k = min(filled, n - filled)
        # both factors < 2^32, so the product fits in 64 bits; wrapping mod 2^64 keeps it right mod 2^32
        seeds[filled:filled + k] = (seeds[:k] * np.uint64(mul) + np.uint64(add)) & np.uint64(_LCG_M - 1)
        mul, add, filled = (mul * mul) % _LCG_M, (mul * add + add) % _LCG_M, filled * 2
    return (seeds[:n] % np.uint64(255)).astype(np.uint8)


def _scrambled(block: np.ndarray) -> np.ndarray:
    """XOR the low nibbles with the key stream, in row-major order (its own inverse)."""
    return block.astype(np.uint8) ^ (key_stream(block.size).reshape(block.shape) & 0x0F)


def _dotted(block: np.ndarray, shades: np.ndarray) -> np.ndarray:
    """Draw A1111's dot pattern into the block's high nibbles (cosmetic: readers mask it off)."""
    height, width = block.shape[:2]
    dots = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(dots)
    i = 0
    for x in range(-6, width, 8):
        for row, y in enumerate(range(-6, height, 8)):
            shift = 4 if row % 2 == 0 else 0
            shade = int(shades[i % len(shades)])
            draw.ellipse((x + shift, y, x + 6 + shift, y + 6), fill=(shade, shade, shade))
            i += 1
    return block ^ (np.asarray(dots, dtype=np.uint8) & 0xF0)


def _shades(edge) -> np.ndarray:
    """The dots' grey levels: |v| / max|v| x 255 over the first vector's first 1024 values."""
    values = np.abs(np.asarray(edge, dtype=np.float64).ravel()[:_EDGE_VALUES])
    top = values.max() if values.size else 0.0
    if not np.isfinite(top) or top == 0:
        return np.zeros(1, dtype=np.uint8)
    return (values / top * 255).astype(np.uint8)


def _padded_length(n: int, height: int) -> int:
    """A1111's padding: up past a multiple of the height, then up past a multiple of 3 x height
    (each step adds a whole one when already a multiple), so the bytes fill whole RGB columns."""
    n += height - n % height
    return n + 3 * height - n % (3 * height)


def hide(picture: Image.Image, data: dict, edge) -> Image.Image:
    """The card: [low-nibble block][black column][picture][black column][high-nibble block]."""
    height = picture.height
    packed = np.frombuffer(zlib.compress(json.dumps(data).encode(), level=9), dtype=np.uint8)
    # np.resize repeats the bytes to fill the padding (as A1111 does): zlib stops at its stream's end
    packed = np.resize(packed, _padded_length(packed.size, height))
    shades = _shades(edge)
    low = _scrambled(_dotted((packed & 0x0F).reshape(height, -1, 3), shades))
    high = _scrambled(_dotted((packed >> 4).reshape(height, -1, 3), shades[::-1]))
    # A reader's crop of the black border never reaches the data: row 0 starts with zlib's header
    # (never black), and the padding, at least a column's height of bytes, fills the last rows.
    image = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    gap = np.zeros((height, 1, 3), dtype=np.uint8)
    return Image.fromarray(np.concatenate([low, gap, image, gap, high], axis=1), mode="RGB")


def find_hidden(image: Image.Image, object_hook=None) -> dict | None:
    """The dict hidden in a card's pixels, None when the picture holds none; tensors stay
    {"TORCHTENSOR": lists} unless `object_hook` (json.loads') turns them into something."""
    pixels = _cropped(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    empty = np.flatnonzero(pixels.sum(axis=(0, 2)) == 0)
    if empty.size < 2:
        return None
    low, high = pixels[:, :empty[0]], pixels[:, empty[-1] + 1:]
    if low.size == 0 or low.shape != high.shape:
        return None
    packed = ((_scrambled(high) << 4) | _scrambled(low)).tobytes()
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(packed, _MAX_HIDDEN_BYTES)
        found = json.loads(text, object_hook=object_hook) if inflater.eof else None
    except (zlib.error, ValueError, RecursionError):
        return None
    return found if isinstance(found, dict) else None


def _cropped(pixels: np.ndarray) -> np.ndarray:
    """Cut the black border: keep the box around the pixels whose every channel is above 0."""
    lit = (pixels > 0).all(axis=2)
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if rows.size == 0:
        return pixels[:0, :0]
    return pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


# --------------------------------------------------------------------------- the picture


def preview_for(run_dir: os.PathLike | str, step: int | None = None) -> Path | None:
    """The run's preview at `step` or the latest before it (None: the latest of all), if any."""
    found = []
    for path in Path(run_dir, "previews").glob("step-*.png"):
        match = _PREVIEW.match(path.name)
        if match and (step is None or int(match.group(1)) <= step):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def card_picture(source: os.PathLike | str | None) -> Image.Image:
    """The card's square picture: `source` cropped to its centre and scaled to 512 px, or a plain
    dark square when there is nothing to show (an imported word without images)."""
    from PIL import ImageOps

    if source is None:
        return Image.new("RGB", (CARD_SIZE, CARD_SIZE), (48, 48, 56))
    try:
        with Image.open(source) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
    except OSError as exc:
        raise UserError(f"{source}: cannot read the card's picture ({exc}); pick another run or step") from None
    return ImageOps.fit(image, (CARD_SIZE, CARD_SIZE), Image.Resampling.LANCZOS)


def captioned(picture: Image.Image, title: str, left: str = "", middle: str = "", right: str = "") -> Image.Image:
    """A1111's caption: a dark band fading in at the top and the bottom, the word's name large in
    the top-left corner, three small footers along the bottom edge."""
    width, height = picture.size
    y = np.arange(height, dtype=np.float64)
    shade = np.maximum(1 - np.cos(y / height * 1.5), 1 - np.cos((height - y) / height * 1.5 * 1.1))
    alpha = np.clip((255 * shade).astype(np.int64), 0, 255).astype(np.uint8)
    band = np.zeros((height, width, 4), dtype=np.uint8)
    band[..., 3] = alpha[:, None]
    image = Image.alpha_composite(picture.convert("RGBA"), Image.fromarray(band, mode="RGBA")).convert("RGB")
    draw = ImageDraw.Draw(image)
    pad, white = 10, (255, 255, 255)
    draw.text((pad, pad), title, font=_font_to_fit(title, width * 0.75 - 4 * pad), fill=white, anchor="lt")
    footers = [(left, (pad, height - pad), "ls"), (middle, (width / 2, height - pad), "ms"),
               (right, (width - pad, height - pad), "rs")]
    font = min((_font_to_fit(text, width / 3 - pad) for text, _, _ in footers if text),
               key=lambda f: getattr(f, "size", 0), default=None)
    for text, where, anchor in footers:
        if text:
            draw.text(where, text, font=font, fill=white, anchor=anchor)
    return image


def _font_to_fit(text: str, room: float, base: int = 32, largest: int = 72):
    """Pillow's own font, sized so `text` fills `room` pixels (at most `largest` pt)."""
    measured = ImageFont.load_default(size=base).getbbox(text or " ")
    width = max(1, measured[2] - measured[0])
    return ImageFont.load_default(size=max(8, min(int(base * room / width), largest)))


# --------------------------------------------------------------------------- the file


def write_card(path: os.PathLike | str, blocks, token: str, picture: Image.Image, *, step: int | None = None,
               model_name: str | None = None, footer: str = "") -> Path:
    """Write the card atomically: `picture` captioned with the word, the embedding in its chunk
    and in its pixels.  blocks: one [n, width] array (SD 1.x/2.x) or two (SDXL: clip_l, clip_g)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: an a1111-png card is a PNG picture; give an --out path ending in .png")
    blocks = [np.asarray(b, dtype=np.float32) for b in blocks]
    data = payload(blocks, token, step, model_name)
    n = blocks[0].shape[0]
    steps = f" {step}s" if step else ""  # an imported word has no steps of its own
    card = hide(captioned(picture, token, model_name or "", footer, f"{n}v{steps}"), data, blocks[0][0])
    info = PngImagePlugin.PngInfo()
    info.add_text(CHUNK, chunk_text(data))
    with atomic_path(path) as tmp:
        card.save(tmp, format="PNG", pnginfo=info)
    return path


def write_word_card(path: os.PathLike | str, concept, used) -> Path:
    """The card of a library word: `used` (engine.sd.generation.UsedEmbedding), a run of `concept`.

    Its picture: the run's preview at the word's step or the latest before it (what the word
    drew), else the concept's first training image, else a plain square.  Its footers: the
    model the run trained on, its family, the vectors and steps (A1111's: model, hash, "Nv Ss")."""
    from engine.sd.family import FAMILY_LABELS, family_of_widths
    from engine.store.runs import Run

    run_dir = Path(concept.runs_dir) / used.run
    source = preview_for(run_dir, None if used.final else used.step) or next(iter(concept.images), None)
    blocks = [block.numpy() for block in used.blocks]
    try:
        model = Run.load(run_dir).get("model") or {}
    except (OSError, ValueError):
        model = {}
    model = model if isinstance(model, dict) else {}
    family = model.get("family") or family_of_widths(block.shape[1] for block in blocks)
    return write_card(path, blocks, used.token, card_picture(source), step=used.step,
                      model_name=_model_name(model.get("spec")), footer=FAMILY_LABELS.get(family, ""))


def _model_name(spec: str | None) -> str | None:
    """A model's short name, as A1111 shows a checkpoint: a file's or folder's stem, else the spec."""
    if not spec:
        return None
    return Path(spec).stem if os.sep in spec or spec.endswith((".safetensors", ".ckpt")) else spec

