"""The CLI of issue 26's data parts: captions and masks into the library, shown back, and the
training options' refusals (one line, exit 2, nothing written, nothing submitted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_annotations import kohya_folder
from test_train_cli import cli

pytestmark = pytest.mark.timeout(300)


def _home() -> Path:
    return Path(os.environ["TISTUDIO_HOME"])


def test_concept_add_takes_a_kohya_folder_and_show_gives_captions_and_masks(capsys, tmp_path):
    images, masks = kohya_folder(tmp_path)
    code, out, _ = cli(capsys, "concept", "add", "ball", "--images", str(images), "--init", "ball",
                       "--masks", str(masks))
    assert code == 0 and "3 images (2 with a caption, 2 with a mask)" in out
    code, out, _ = cli(capsys, "concept", "show", "ball", "--json")
    shown = json.loads(out)
    assert shown["captions"] == {"000.png": "a red ball on a sofa", "002.png": "beside a window"}
    assert sorted(shown["masks"]) == ["001.png", "002.png"] and Path(shown["masks"]["001.png"]).is_file()
    code, out, _ = cli(capsys, "concept", "show", "ball")
    assert "000.png  a red ball on a sofa" in out and "001.png [mask]" in out
    extra = images / "a.png"
    code, out, _ = cli(capsys, "concept", "images", "add", "ball", str(extra), "--caption", "on the beach")
    assert code == 0 and "003.png" in out and "(1 with a caption)" in out
    code, out, _ = cli(capsys, "concept", "images", "caption", "ball", "003.png", "at night")
    assert code == 0 and "'at night'" in out
    code, out, _ = cli(capsys, "concept", "images", "caption", "ball", "003.png")
    assert code == 0 and "no caption" in out
    assert "003.png" not in json.loads(cli(capsys, "concept", "show", "ball", "--json")[1])["captions"]


def test_a_bad_caption_file_or_mask_is_one_line_and_leaves_nothing(capsys, tmp_path):
    images, masks = kohya_folder(tmp_path)
    (images / "b.txt").write_bytes(b"\xff\xfebad")
    code, _, err = cli(capsys, "concept", "add", "ball", "--images", str(images), "--init", "ball")
    assert code == 2 and "b.txt is not UTF-8 text" in err and len(err.strip().splitlines()) == 1
    (images / "b.txt").unlink()
    from PIL import Image

    Image.new("L", (10, 10)).save(masks / "c.png")
    code, _, err = cli(capsys, "concept", "add", "ball", "--images", str(images), "--init", "ball",
                       "--masks", str(masks))
    assert code == 2 and "a mask must be the size of its image" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "concept", "add", "ball", "--images", str(images), "--init", "ball",
                       "--caption-ext", ".png")
    assert code == 2 and "--caption-ext .png is an image extension" in err
    assert not list((_home() / "concepts").iterdir())


@pytest.mark.parametrize("options, words", [
    (["--ema", "1.5"], "--ema must be a decay between 0 and 1"),
    (["--buckets", "--center-crop"], "--buckets keeps each image's aspect ratio and --center-crop"),
    (["--buckets", "--resolution", "520", "--model", "builtin:sd15-arch"],
     "--buckets needs a resolution in steps of 64 px on this model, not 520; give --resolution 512"),
    (["--buckets", "--resolution", "64", "--model", "builtin:sd15-arch"], "no sizes but the square"),
])
def test_training_options_refused_before_anything_is_submitted(capsys, image_dir, options, words):
    assert cli(capsys, "concept", "add", "toy", "--images", str(image_dir), "--init", "cat")[0] == 0
    code, _, err = cli(capsys, "train", "toy", *options)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not list(_home().glob("concepts/*/runs/*")) and not (_home() / "engine" / "engine.sock").exists()


def test_the_train_help_names_the_data_options(capsys):
    code, out, _ = cli(capsys, "train", "--help")
    assert code == 0 and all(o in out for o in ("--buckets", "--masked-loss", "--ema DECAY", "{caption}",
                                                "[filewords]"))


def test_train_prints_what_the_run_trains_on_from_its_header(capsys):
    from tistudio.commands.progress import RunProgress

    header = {"type": "train", "images": 4, "masked": 1, "captioned": 2, "masked_loss": True, "ema": 0.99,
              "buckets": [{"width": 88, "height": 44, "images": 3}, {"width": 64, "height": 64, "images": 1}],
              "prompts": ["a photo of a <ball>, on a sofa"] * 54}
    with RunProgress("r1") as view:
        view.update(header)
        view.update({"type": "train", "images": 4, "masked": 0, "captioned": 0, "buckets": None, "ema": None})
    assert capsys.readouterr().out.splitlines() == [
        "data: 4 images in 2 buckets (88×44: 3, 64×64: 1), 1 with a mask, 2 captioned (54 prompts), EMA 0.99"]
