"""Training images: find them, check them, and copy them into a concept.

Every check happens before anything is written, so a bad file in a folder of
twenty never leaves a concept with nineteen images.  Images are stored as
8-bit RGB PNGs (EXIF rotation applied, transparency flattened onto white) so
the training code never has to care what the user's camera or editor did.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

from engine.errors import UserError, one_line
from engine.store.paths import atomic_path, ensure_private_dir

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MIN_SIDE = 64
# 64 megapixels: far above anything useful for SD training (512-1024 px), far
# below what would exhaust memory.  Checked from the header, before decoding.
MAX_PIXELS = 64_000_000

_STORED_NAME = re.compile(r"^(\d+)\.png$")


def load_image(path: os.PathLike | str) -> Image.Image:
    """Open, fully decode and normalise one image to upright 8-bit RGB.

    Raises UserError naming the file if it is not an image, is corrupt or
    truncated, is absurdly large, or is too small to train on.
    """
    return load_image_and_alpha(path)[0]


def load_image_and_alpha(path: os.PathLike | str) -> tuple[Image.Image, Image.Image | None]:
    """As `load_image`, with the image's transparency as an 8-bit "L" mask (255: opaque), or None
    when it has none or is opaque everywhere.  kohya's alpha masks: the alpha says what to train."""
    path = Path(path)
    try:
        # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; a
        # warning would be lost on a terminal UI, so make it an error.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixel_count(path, img.size)
                img.load()  # decode now, so a truncated file fails here and not mid-training
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
                alpha = _alpha(img)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path} has too many pixels for Pillow to open safely; downscale it or remove it") from None
    except Image.UnidentifiedImageError:
        raise UserError(f"{path} is not an image Pillow can read; remove it or re-save it as PNG or JPEG") from None
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; check the path") from None
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied); fix its permissions or remove it") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - codecs raise OSError, SyntaxError, ValueError, struct.error ...
        raise UserError(f"{path} is corrupt or truncated ({one_line(exc, 120)}); re-export it or remove it") from None
    _check_min_size(path, rgb.size)
    return rgb, alpha


def _check_pixel_count(path: Path, size: tuple[int, int]) -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise UserError(
            f"{path} is {w}×{h} px ({_mp(w * h)} MP), over the {_mp(MAX_PIXELS)} MP limit; "
            "downscale it or remove it"
        )


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.0f}" if pixels >= 10e6 else f"{pixels / 1e6:.2g}"


def _check_min_size(path: Path, size: tuple[int, int]) -> None:
    w, h = size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise UserError(f"{path} is {w}×{h} px; training images must be at least {MIN_SIDE} px on each side")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> a new 8-bit RGB image detached from the file."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _wide_grey_to_rgb(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # convert() always returns a copy, so the result outlives the open file.
    return img.convert("RGB")


def _alpha(img: Image.Image) -> Image.Image | None:
    """The alpha channel as "L", or None if the image has none or hides nothing."""
    if not _has_alpha(img) or img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return None
    alpha = img.convert("RGBA").getchannel("A")
    return None if alpha.getextrema()[0] == 255 else alpha


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info


def _wide_grey_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's own convert("RGB") clips 16-bit values at 255, turning most
    # 16-bit greyscale photos pure white; scale them down instead.
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
    top = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16") or 255 < top <= 65535:
        arr = arr / 257.0
    elif img.mode == "F" and top <= 1.0:
        arr = arr * 255.0  # float images are usually 0..1
    elif top > 65535:
        arr = (arr - arr.min()) * (255.0 / max(top - arr.min(), 1.0))
    grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def collect_images(folder: os.PathLike | str) -> list[Path]:
    """Image files directly inside `folder` (not subfolders), sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise UserError(f"image folder {folder} does not exist; pass the folder that holds the training images")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass the folder that holds the training images")
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise UserError(f"cannot read image folder {folder} ({one_line(exc, 120)}); check its permissions") from None
    root = folder.resolve()
    found = [Path(e.path) for e in entries if _is_candidate(e, root)]
    if not found:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(f"no images in {folder} (looked for {exts}); put the training images directly in that folder")
    return found


def _is_candidate(entry: os.DirEntry, root: Path) -> bool:
    # Hidden files are editor/OS litter (.DS_Store, macOS "._x.jpg" forks).
    if entry.name.startswith(".") or Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
        return False
    if entry.is_symlink():
        _check_link_inside(Path(entry.path), root)
    try:
        return entry.is_file()  # follows links; skips folders and FIFOs named *.png
    except OSError:
        return False


def _check_link_inside(link: Path, root: Path) -> None:
    # A link out of the folder could drag in any file the user can read
    # (e.g. a shared folder pointing at ~/.ssh), so only links that stay put
    # are followed.
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        raise UserError(f"{link} is a broken link; remove it or replace it with the real file") from None
    if not target.is_relative_to(root):
        raise UserError(f"{link} links outside the image folder (to {target}); copy the real file in instead")


def validate_images(paths: Iterable[os.PathLike | str]) -> None:
    """Decode every image once and drop it; raises UserError at the first bad one."""
    for path in paths:
        load_image(path)


def write_images(paths: Iterable[os.PathLike | str], dest_dir: os.PathLike | str) -> list[Path]:
    """Re-decode each image and store it as dest_dir/NNN.png, numbering after any already there.

    On failure, the files written by this call are removed again.
    """
    dest_dir = ensure_private_dir(Path(dest_dir))
    start = _next_index(dest_dir)
    written: list[Path] = []
    try:
        for i, path in enumerate(paths, start):
            target = dest_dir / f"{i:03d}.png"
            with atomic_path(target, suffix=".png") as tmp:
                load_image(path).save(tmp, format="PNG")
            written.append(target)
    except BaseException:
        for target in written:
            with contextlib.suppress(OSError):
                target.unlink()
        raise
    return written


def _next_index(dest_dir: Path) -> int:
    taken = [int(m.group(1)) for p in dest_dir.iterdir() if (m := _STORED_NAME.match(p.name))]
    return max(taken, default=-1) + 1


def import_images(src_folder: os.PathLike | str, dest_dir: os.PathLike | str) -> list[Path]:
    """Validate every image in `src_folder`, then (only if all pass) store them as PNGs in `dest_dir`."""
    paths = collect_images(src_folder)
    # Decoding twice (check, then write) keeps memory at one image instead of
    # holding the whole folder decoded until the last file has been checked.
    validate_images(paths)
    return write_images(paths, dest_dir)
