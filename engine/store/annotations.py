"""What a training image may carry besides its pixels: a caption and a loss mask.

A concept keeps them beside its images, under the image's number:

    images/003.png    the image (engine.store.images)
    images/003.txt    its caption: one line of UTF-8 text, at most 1,000 characters
    masks/003.png     its mask: 8-bit grey, the image's size; white trains, black is ignored

They come in the ways the other tools take them (kohya sd-scripts, OneTrainer):

* a caption file beside the source image with its stem (`photo.txt` beside `photo.png`;
  another extension with `--caption-ext`); its first non-blank line is the caption, as kohya
  reads it;
* a mask image with the image's file name (or stem) in a folder of masks (`--masks DIR`,
  kohya's conditioning folder), whose R channel is read; else the image's own transparency
  (kohya's alpha masks).  A mask must be the size of its image.

Every caption and mask is read and checked before anything is written, and each is written
atomically with its image, so a refused folder leaves the concept as it was.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageOps

from engine.errors import UserError, one_line
from engine.store import images as _images
from engine.store.paths import atomic_path, atomic_write_text, ensure_private_dir

MAX_CAPTION = 1000  # characters
CAPTION_SUFFIX = ".txt"  # how a concept stores a caption, and the default --caption-ext
MASKS_DIR = "masks"
# A caption file over this many bytes holds more than MAX_CAPTION characters (UTF-8: at most 4
# bytes a character, and a byte-order mark): refused without reading it.
_MAX_CAPTION_BYTES = 4 * MAX_CAPTION + 3


@dataclass(frozen=True)
class ImageSource:
    """An image to add, with its caption and the mask file that goes with it (None: the
    image's own transparency, if it has any)."""

    path: Path
    caption: str | None = None
    mask: Path | None = None


# --- captions ------------------------------------------------------------------------------------


def check_caption(text: str | None, where: str) -> str | None:
    """A caption as stored: one line (runs of whitespace and line breaks become one space), at
    most MAX_CAPTION characters; None when empty.  `where` names its source in the refusal."""
    if text is None:
        return None
    if any(_is_control(c) for c in text):
        raise UserError(f"{where} is not text (it holds control characters); give plain UTF-8 text")
    caption = " ".join(text.split())
    if len(caption) > MAX_CAPTION:
        raise UserError(f"{where} is {len(caption):,} characters; a caption holds at most {MAX_CAPTION:,}, "
                        "so shorten it")
    return caption or None


def read_caption_file(path: os.PathLike | str) -> str | None:
    """The caption in a caption file: its first non-blank line (kohya's rule), or None if blank.
    UserError naming the file if it is not UTF-8 text or is over MAX_CAPTION characters."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > _MAX_CAPTION_BYTES:
            raise UserError(f"{path} is {size:,} bytes, more than a caption's {MAX_CAPTION:,} characters; "
                            "shorten it")
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save the caption as UTF-8 or remove the file") from None
    except OSError as exc:
        raise UserError(f"cannot read caption file {path} ({one_line(exc, 100)}); check its permissions") from None
    if len(text) > MAX_CAPTION:
        raise UserError(f"{path} is {len(text):,} characters; a caption holds at most {MAX_CAPTION:,}, "
                        "so shorten it")
    if any(_is_control(c) for c in text):
        raise UserError(f"{path} is not text (it holds control characters); save the caption as UTF-8 text")
    lines = [line for line in text.splitlines() if line.strip()]
    return check_caption(lines[0], str(path)) if lines else None


def caption_file(image: Path) -> Path:
    """Where a stored image's caption lives: images/003.txt beside images/003.png."""
    return image.with_suffix(CAPTION_SUFFIX)


def caption_of(image: os.PathLike | str) -> str | None:
    """A stored image's caption, or None (training refuses a caption file gone bad, with its name)."""
    path = caption_file(Path(image))
    return read_caption_file(path) if path.is_file() else None


def captions_of(images: Iterable[os.PathLike | str]) -> dict[str, str]:
    """{file name: caption} of the images that have one, for showing (an unreadable one is skipped)."""
    found = {}
    for image in images:
        with contextlib.suppress(UserError):
            caption = caption_of(image)
            if caption:
                found[Path(image).name] = caption
    return found


def caption_suffix(ext: str) -> str:
    """A --caption-ext as a file suffix: "txt" and ".txt" both give ".txt"."""
    ext = str(ext).strip()
    suffix = ext if ext.startswith(".") else f".{ext}"
    if len(suffix) < 2 or "/" in suffix or "\\" in suffix or len(suffix.split()) != 1 or suffix.count(".") > 1:
        raise UserError(f"--caption-ext {ext!r} is not a file extension; give one such as .txt or .caption")
    if suffix.lower() in _images.IMAGE_EXTENSIONS:
        raise UserError(f"--caption-ext {suffix} is an image extension; captions are text files, e.g. .txt")
    return suffix


# --- masks ---------------------------------------------------------------------------------------


def mask_file(image: Path) -> Path:
    """Where a stored image's mask lives: masks/003.png for images/003.png."""
    return image.parent.parent / MASKS_DIR / image.name


def mask_of(image: os.PathLike | str) -> Path | None:
    """A stored image's mask file, or None (the image counts whole)."""
    path = mask_file(Path(image))
    return path if path.is_file() else None


def find_mask(image: Path, folder: Path) -> Path | None:
    """The mask for `image` in a folder of masks: the same file name, else the same stem with
    an image extension (`photo.jpg`'s mask may be `photo.png`)."""
    exact = folder / image.name
    if exact.is_file():
        return exact
    for suffix in sorted(_images.IMAGE_EXTENSIONS):
        for candidate in (folder / f"{image.stem}{suffix}", folder / f"{image.stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def load_mask(path: os.PathLike | str, size: tuple[int, int], image: os.PathLike | str) -> Image.Image:
    """A mask file as 8-bit grey ("L"), upright: its R channel (kohya reads the R channel of a
    mask image).  UserError naming the file if it is unreadable or not the size of `image`."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _images._check_pixel_count(path, img.size)
                img.load()
                img = ImageOps.exif_transpose(img)
                wide = img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
                rgb = _images._wide_grey_to_rgb(img) if wide else img.convert("RGB")
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, Image.UnidentifiedImageError, OSError,
            ValueError, SyntaxError) as exc:
        raise UserError(f"mask {path} is not an image Pillow can read ({one_line(exc, 80)}); re-save it as PNG "
                        "or remove it") from None
    if rgb.size != tuple(size):
        (mw, mh), (w, h) = rgb.size, size
        raise UserError(f"mask {path} is {mw}×{mh} px but its image {image} is {w}×{h}; a mask must be the size "
                        "of its image")
    return rgb.getchannel("R")


def overlay(image: os.PathLike | str, mask: os.PathLike | str | None) -> Image.Image:
    """The image with what its mask ignores tinted red (white in the mask: as it is; black: red),
    for showing a mask over its image; the image as it is without one."""
    picture = Image.open(image).convert("RGB")
    if mask is None:
        return picture
    grey = Image.open(mask).convert("L").resize(picture.size)
    tinted = Image.blend(picture, Image.new("RGB", picture.size, (220, 30, 30)), 0.6)
    return Image.composite(picture, tinted, grey)


# --- gathering, checking and writing ------------------------------------------------------------


def gather(paths: Iterable[os.PathLike | str], *, caption_ext: str = CAPTION_SUFFIX,
           masks: os.PathLike | str | None = None, caption: str | None = None) -> list[ImageSource]:
    """Each image with its caption (`caption`, else a caption file beside it with `caption_ext`)
    and its mask file (from the folder `masks`).  Captions are read and checked here; a folder of
    masks of which none fits an image is refused (a wrong folder, most likely)."""
    suffix = caption_suffix(caption_ext)
    given = check_caption(caption, "--caption")
    folder = _mask_folder(masks)
    sources = []
    for path in map(Path, paths):
        beside = path.with_suffix(suffix)
        text = given if given is not None else (read_caption_file(beside) if beside.is_file() else None)
        sources.append(ImageSource(path, text, find_mask(path, folder) if folder else None))
    if folder is not None and sources and not any(s.mask for s in sources):
        raise UserError(f"--masks {folder}: no mask there has an image's file name (e.g. {sources[0].path.name}); "
                        "name each mask as its image")
    return sources


def _mask_folder(masks: os.PathLike | str | None) -> Path | None:
    if masks is None:
        return None
    folder = Path(masks).expanduser()
    if not folder.is_dir():
        raise UserError(f"--masks {folder} is not a folder; give the folder that holds the masks")
    return folder


def validate(sources: Iterable[ImageSource]) -> None:
    """Decode every image and mask once, and drop them: a UserError at the first bad one."""
    for source in sources:
        image = _images.load_image(source.path)
        if source.mask is not None:
            load_mask(source.mask, image.size, source.path)


def write(sources: Iterable[ImageSource], concept_dir: os.PathLike | str) -> list[Path]:
    """Store each image as images/NNN.png (numbered after those there) with its caption
    (images/NNN.txt) and mask (masks/NNN.png), each file atomically; a failure removes what
    this call wrote.  Returns the stored images."""
    concept_dir = Path(concept_dir)
    image_dir = ensure_private_dir(concept_dir / "images")
    start = _images._next_index(image_dir)
    written: list[Path] = []
    try:
        for number, source in enumerate(sources, start):
            target = image_dir / f"{number:03d}.png"
            written += _write_one(source, target)
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return [p for p in written if p.parent == image_dir and p.suffix == ".png"]


def _write_one(source: ImageSource, target: Path) -> list[Path]:
    """One image's files, the image last (it is what makes the entry exist); a stale caption or
    mask under its number (left by a crash) is replaced or removed."""
    written = []
    image, alpha = _images.load_image_and_alpha(source.path)
    mask = load_mask(source.mask, image.size, source.path) if source.mask is not None else alpha
    caption_path, mask_path = caption_file(target), mask_file(target)
    if source.caption:
        atomic_write_text(caption_path, source.caption + "\n")
        written.append(caption_path)
    else:
        caption_path.unlink(missing_ok=True)
    if mask is not None:
        ensure_private_dir(mask_path.parent)
        with atomic_path(mask_path, suffix=".png") as tmp:
            mask.save(tmp, format="PNG")
        written.append(mask_path)
    else:
        mask_path.unlink(missing_ok=True)
    with atomic_path(target, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    written.append(target)
    return written


def set_caption(image: Path, text: str | None) -> str | None:
    """Give a stored image a caption (None or blank: remove it); returns the caption stored."""
    caption = check_caption(text, f"the caption of {image.name}")
    path = caption_file(image)
    if caption:
        atomic_write_text(path, caption + "\n")
    else:
        path.unlink(missing_ok=True)
    return caption


def companions(image: Path) -> list[Path]:
    """A stored image's caption and mask files that exist (they go where the image goes)."""
    return [p for p in (caption_file(image), mask_file(image)) if p.is_file()]


def _is_control(char: str) -> bool:
    import unicodedata

    return char not in "\t\n\r" and unicodedata.category(char) in ("Cc", "Cs")
