"""Captions and masks beside a concept's images, taken the way kohya sd-scripts lays them out:
`NAME.txt` beside `NAME.png`, transparency as the mask, or a mask of the same name in a folder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.errors import UserError
from engine.store import annotations
from engine.store.library import Library


def _picture(path, size=(80, 64), alpha=None, seed=0):
    rng = np.random.RandomState(seed)
    pixels = (rng.rand(size[1], size[0], 3) * 255).astype("uint8")
    if alpha is not None:
        pixels = np.dstack([pixels, alpha])
    Image.fromarray(pixels).save(path)
    return path


def kohya_folder(root):
    """A kohya-layout folder: captions beside the images, one image with an alpha mask, and a
    mask folder holding another's mask under the same stem (kohya's conditioning folder)."""
    images, masks = root / "train", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    _picture(images / "a.png", seed=1)
    (images / "a.txt").write_text("a red ball on a sofa\nsecond line is ignored\n", encoding="utf-8")
    alpha = np.zeros((64, 80), dtype="uint8")
    alpha[:, 40:] = 255  # right half trains, left half is ignored
    _picture(images / "b.png", alpha=alpha, seed=2)
    _picture(images / "c.jpg", seed=3)
    (images / "c.txt").write_text("\ufeffbeside a window", encoding="utf-8")  # a BOM is fine
    grey = np.full((64, 80, 3), 127, dtype="uint8")
    grey[:, :, 1:] = 0  # kohya reads the R channel
    Image.fromarray(grey).save(masks / "c.png")
    return images, masks


def test_a_kohya_folder_brings_its_captions_and_both_kinds_of_mask(tmp_path):
    images, masks = kohya_folder(tmp_path)
    concept = Library(tmp_path / "home").add("ball", images, "ball", masks=masks)
    stored = concept.images
    assert [p.name for p in stored] == ["000.png", "001.png", "002.png"]
    assert annotations.caption_of(stored[0]) == "a red ball on a sofa"  # kohya's first line
    assert annotations.caption_of(stored[1]) is None
    assert annotations.caption_of(stored[2]) == "beside a window"
    assert annotations.mask_of(stored[0]) is None  # no alpha, no mask file: counts whole
    alpha = np.asarray(Image.open(annotations.mask_of(stored[1])))
    assert alpha.shape == (64, 80) and alpha[:, :40].max() == 0 and alpha[:, 40:].min() == 255
    grey = np.asarray(Image.open(annotations.mask_of(stored[2])))
    assert grey.shape == (64, 80) and (grey == 127).all()
    assert Image.open(stored[1]).mode == "RGB"  # the image itself is stored flattened, as before
    assert annotations.captions_of(stored) == {"000.png": "a red ball on a sofa", "002.png": "beside a window"}


def test_another_caption_extension(tmp_path):
    images, _ = kohya_folder(tmp_path)
    (images / "b.caption").write_text("kohya's default extension", encoding="utf-8")
    concept = Library(tmp_path / "home").add("ball", images, "ball", caption_ext="caption")
    assert annotations.captions_of(concept.images) == {"001.png": "kohya's default extension"}


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe\x00b\x00a\x00d", "not UTF-8 text"),
    ("x" * 1001, "1,001 characters"),
    (b"caption\x00with a NUL", "not text"),
])
def test_a_bad_caption_file_is_refused_and_nothing_is_written(tmp_path, content, words):
    images, _ = kohya_folder(tmp_path)
    path = images / "b.txt"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    library = Library(tmp_path / "home")
    with pytest.raises(UserError, match=words) as err:
        library.add("ball", images, "ball")
    assert "b.txt" in str(err.value) and "\n" not in str(err.value)
    assert library.list() == [] and not any((tmp_path / "home" / "concepts").iterdir())


def test_a_mask_of_another_size_is_refused_and_nothing_is_written(tmp_path):
    images, masks = kohya_folder(tmp_path)
    Image.new("L", (40, 32), 255).save(masks / "c.png")
    library = Library(tmp_path / "home")
    with pytest.raises(UserError, match=r"mask .*c\.png is 40×32 px but its image .*c\.jpg is 80×64"):
        library.add("ball", images, "ball", masks=masks)
    assert not any((tmp_path / "home" / "concepts").iterdir())
    with pytest.raises(UserError, match="no mask there has an image's file name"):
        library.add("ball", images, "ball", masks=tmp_path / "home")  # a folder with no masks in it


def test_images_added_later_with_a_caption_then_edited_and_removed_with_their_files(tmp_path):
    library = Library(tmp_path / "home")
    library.add("ball", None, "ball")
    alpha = np.full((64, 80), 255, dtype="uint8")
    alpha[0, 0] = 0
    one = _picture(tmp_path / "one.png", alpha=alpha)
    two = _picture(tmp_path / "two.png", alpha=np.full((64, 80), 255, dtype="uint8"))  # opaque: no mask
    with pytest.raises(UserError, match="--caption is 1,200 characters"):
        library.add_images("ball", [one], caption="y" * 1200)
    written = library.add_images("ball", [one, two], caption="on  the\nbeach")
    assert [annotations.caption_of(p) for p in written] == ["on the beach", "on the beach"]
    assert annotations.mask_of(written[0]) is not None and annotations.mask_of(written[1]) is None
    assert library.set_caption("ball", "001.png", "  ") is None
    assert annotations.caption_of(written[1]) is None
    library.remove_images("ball", ["000.png"])
    concept = library.get("ball")
    assert [p.name for p in concept.images] == ["001.png"]
    assert not (concept.path / "images" / "000.txt").exists() and not (concept.path / "masks" / "000.png").exists()
    # the next image takes number 002 and brings nothing stale along
    added = library.add_images("ball", [two])
    assert added[0].name == "002.png" and annotations.caption_of(added[0]) is None


def test_the_overlay_tints_what_the_mask_ignores(tmp_path):
    images, _ = kohya_folder(tmp_path)
    concept = Library(tmp_path / "home").add("ball", images, "ball")
    image = concept.images[1]
    shown = np.asarray(annotations.overlay(image, annotations.mask_of(image))).astype(int)
    plain = np.asarray(Image.open(image)).astype(int)
    assert (shown[:, 40:] == plain[:, 40:]).all()  # trained: as it is
    tinted = 0.4 * plain[:, :40] + 0.6 * np.array([220, 30, 30])  # ignored: blended with red
    assert np.abs(shown[:, :40] - tinted).max() <= 1
