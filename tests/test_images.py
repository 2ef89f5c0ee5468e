"""engine.store.images: loading, normalising, collecting and importing training images."""

from __future__ import annotations

import os
import stat
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from engine.errors import UserError
from engine.store import images
from engine.store.images import collect_images, import_images, load_image


def solid(path: Path, size=(96, 80), mode="RGB", color=(200, 30, 30), **save) -> Path:
    Image.new(mode, size, color).save(path, **save)
    return path


def noise_png(path: Path, size=(200, 200)) -> Path:
    # Random pixels so the PNG cannot compress to a few bytes (truncation test).
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(path)
    return path


def forged_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width×height; no real pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def assert_one_line(err: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(err.value)


def near(a, b, tol=12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# ---------------------------------------------------------------- load_image


def test_plain_rgb_png(tmp_path):
    img = load_image(solid(tmp_path / "a.png"))
    assert img.mode == "RGB" and img.size == (96, 80)
    assert img.getpixel((5, 5)) == (200, 30, 30)


def test_exif_rotated_jpeg_is_upright(tmp_path):
    # Stored landscape, left half red / right half blue, EXIF orientation 6
    # ("rotate 90° clockwise to display"): upright it is portrait, red on top.
    img = Image.new("RGB", (120, 80), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 60, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)

    out = load_image(path)
    assert out.size == (80, 120)
    assert near(out.getpixel((40, 10)), (255, 0, 0), tol=40)
    assert near(out.getpixel((40, 110)), (0, 0, 255), tol=40)


def test_cmyk_jpeg(tmp_path):
    out = load_image(solid(tmp_path / "print.jpg", mode="CMYK", color=(0, 255, 255, 0)))
    assert out.mode == "RGB"
    assert near(out.getpixel((10, 10)), (255, 0, 0), tol=20)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    path = solid(tmp_path / "scan.png", mode="I;16", color=40000)
    assert Image.open(path).mode.startswith("I")
    out = load_image(path)
    assert out.mode == "RGB"
    # Clipping would give 255 (white); scaling gives 40000/257 ≈ 156.
    assert near(out.getpixel((0, 0)), (156, 156, 156), tol=1)


def test_32bit_int_and_float_tiff(tmp_path):
    assert near(load_image(solid(tmp_path / "i.tif", mode="I", color=40000)).getpixel((0, 0)), (156,) * 3, 1)
    assert near(load_image(solid(tmp_path / "f.tif", mode="F", color=0.5)).getpixel((0, 0)), (128,) * 3, 1)


def test_palette_png_transparency_becomes_white(tmp_path):
    img = Image.new("P", (80, 80), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.paste(1, (0, 0, 40, 80))  # left half green, right half index 0 (transparent)
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)

    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((10, 10)) == (0, 200, 0)
    assert out.getpixel((70, 10)) == (255, 255, 255)


def test_rgba_png_composited_onto_white(tmp_path):
    img = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    img.paste((255, 0, 0, 128), (0, 0, 40, 80))
    path = tmp_path / "alpha.png"
    img.save(path)

    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((70, 10)) == (255, 255, 255)  # fully transparent -> white, not black
    assert near(out.getpixel((10, 10)), (255, 127, 127), tol=2)


@pytest.mark.parametrize(
    "mode,color,expected",
    [("LA", (0, 0), (255, 255, 255)), ("L", 90, (90, 90, 90)), ("1", 1, (255, 255, 255))],
)
def test_other_modes(tmp_path, mode, color, expected):
    assert load_image(solid(tmp_path / "x.png", mode=mode, color=color)).getpixel((3, 3)) == expected


@pytest.mark.parametrize("ext", ["webp", "bmp", "gif", "tif", "tiff", "jpeg"])
def test_other_formats(tmp_path, ext):
    out = load_image(solid(tmp_path / f"x.{ext}"))
    assert out.mode == "RGB" and out.size == (96, 80)


def test_result_is_detached_from_file(tmp_path):
    path = solid(tmp_path / "a.png")
    img = load_image(path)
    path.unlink()
    assert img.getpixel((0, 0)) == (200, 30, 30)


@pytest.mark.parametrize("size", [(1, 1), (40, 30), (63, 500), (500, 63)])
def test_too_small_refused(tmp_path, size):
    path = solid(tmp_path / "tiny.png", size=size)
    with pytest.raises(UserError) as err:
        load_image(path)
    assert f"{size[0]}×{size[1]} px" in str(err.value)
    assert "at least 64 px on each side" in str(err.value)
    assert str(path) in str(err.value)


def test_exactly_64_accepted(tmp_path):
    assert load_image(solid(tmp_path / "ok.png", size=(64, 64))).size == (64, 64)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_refused(tmp_path, fmt):
    path = noise_png(tmp_path / "full.png")
    if fmt == "jpg":
        jpg = tmp_path / "full.jpg"
        Image.open(path).save(jpg, quality=95)
        path = jpg
    data = path.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        load_image(cut)
    assert "cut." in str(err.value) and "corrupt or truncated" in str(err.value)
    assert_one_line(err)


def test_text_file_named_png_refused(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("definitely not a picture\n")
    with pytest.raises(UserError, match="x.png is not an image"):
        load_image(path)


def test_empty_file_refused(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="empty.jpg"):
        load_image(path)


def test_missing_file_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_over_our_pixel_limit_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    path = solid(tmp_path / "big.png", size=(200, 200))
    with pytest.raises(UserError, match=r"big.png is 200×200 px .*over the 0.01 MP limit"):
        load_image(path)


def test_pillow_bomb_warning_is_an_error(tmp_path, monkeypatch):
    # Between MAX_IMAGE_PIXELS and 2× it Pillow only warns; we refuse.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)
    path = solid(tmp_path / "warn.png", size=(200, 200))
    with pytest.raises(UserError, match="warn.png has too many pixels"):
        load_image(path)


def test_forged_huge_header_refused(tmp_path):
    path = forged_png_header(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(UserError, match="bomb.png"):
        load_image(path)


def test_forged_header_just_over_our_limit_refused(tmp_path):
    # 9000×8000 = 72 MP: under Pillow's own error threshold, over ours.
    path = forged_png_header(tmp_path / "big.png", 9000, 8000)
    with pytest.raises(UserError, match="big.png is 9000×8000 px"):
        load_image(path)


# ---------------------------------------------------------------- collect_images


def test_collect_sorted_filtered(tmp_path):
    for name in ["b.JPG", "a.png", "c.Tiff", "d.webp", ".hidden.png", "._a.png", "notes.txt", "e.gif", "f.bmp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()  # a folder named like an image
    (tmp_path / "sub").mkdir()
    solid(tmp_path / "sub" / "deep.png")
    got = [p.name for p in collect_images(tmp_path)]
    assert got == ["a.png", "b.JPG", "c.Tiff", "d.webp", "e.gif", "f.bmp"]


def test_collect_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        collect_images(tmp_path / "missing")


def test_collect_not_a_folder(tmp_path):
    path = solid(tmp_path / "a.png")
    with pytest.raises(UserError, match="is not a folder"):
        collect_images(path)


@pytest.mark.parametrize("contents", [[], ["readme.txt", ".x.png"]])
def test_collect_no_images(tmp_path, contents):
    for name in contents:
        (tmp_path / name).write_text("x")
    with pytest.raises(UserError, match="no images in"):
        collect_images(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_collect_unreadable_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    solid(folder / "a.png")
    folder.chmod(0)
    try:
        with pytest.raises(UserError, match="cannot read image folder"):
            collect_images(folder)
    finally:
        folder.chmod(0o700)


def test_collect_symlink_outside_refused(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    solid(folder / "a.png")
    secret = solid(tmp_path / "outside.png")
    (folder / "b.png").symlink_to(secret)
    with pytest.raises(UserError, match=r"b\.png links outside the image folder"):
        collect_images(folder)


def test_collect_symlink_inside_allowed(tmp_path):
    solid(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    assert [p.name for p in collect_images(tmp_path)] == ["a.png", "b.png"]


def test_collect_broken_symlink_refused(tmp_path):
    solid(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(UserError, match="b.png is a broken link"):
        collect_images(tmp_path)


# ---------------------------------------------------------------- import_images


def test_import_writes_numbered_private_pngs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    solid(src / "b.jpg", color=(0, 0, 250))
    solid(src / "a.png", mode="RGBA", color=(0, 0, 0, 0))
    dest = tmp_path / "dest"

    written = import_images(src, dest)
    assert [p.name for p in written] == ["000.png", "001.png"]
    assert sorted(p.name for p in dest.iterdir()) == ["000.png", "001.png"]  # no temp files left
    first, second = (Image.open(p) for p in written)
    assert first.format == "PNG" and first.mode == "RGB"
    assert first.getpixel((0, 0)) == (255, 255, 255)  # a.png first; transparency flattened
    assert near(second.getpixel((0, 0)), (0, 0, 250), tol=5)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in written)


def test_import_numbers_after_existing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    solid(src / "a.png")
    dest = tmp_path / "dest"
    import_images(src, dest)
    assert [p.name for p in import_images(src, dest)] == ["001.png"]


def test_import_checks_everything_before_writing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    solid(src / "a.png")
    solid(src / "b.png")
    solid(src / "z.png", size=(40, 30))  # the last one is bad
    dest = tmp_path / "dest"
    with pytest.raises(UserError, match="40×30"):
        import_images(src, dest)
    assert not dest.exists()


def test_write_failure_removes_partial_output(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for name in "abc":
        solid(src / f"{name}.png")
    dest = tmp_path / "dest"
    real = images.load_image
    calls = []

    def flaky(path):
        calls.append(path)
        if len(calls) == 6:  # 3 validation loads, then fail on the 3rd write
            raise OSError("disk full")
        return real(path)

    monkeypatch.setattr(images, "load_image", flaky)
    with pytest.raises(OSError):
        import_images(src, dest)
    assert list(dest.iterdir()) == []
