"""Issue 26 in the studio: captions edited and masks shown in the Library's images dialog, and
the data options (buckets, masked loss, EMA, A1111 templates) in the New-run form."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_annotations import kohya_folder
from textual.widgets import Button, Checkbox, Input, SelectionList

from studio import SIZE, fill_train_form, notes, offline_app, wait_for
from tistudio.config import Config

pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")


async def test_the_images_dialog_edits_captions_and_shows_a_mask_over_its_image(tmp_path):
    from engine.store import annotations
    from engine.store.library import Library
    from tistudio.screens.modals import ImagesModal
    from tistudio.widgets.images import ImagePreview

    home = tmp_path / "home"
    images, masks = kohya_folder(tmp_path)
    Library(home).add("ball", images, "ball", masks=masks)
    app = offline_app(home, add_sample=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("e")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, ImagesModal) and app.screen, 5, "the dialog")
        listing = dialog.query_one("#remove", SelectionList)
        assert "000.png  a red ball on a sofa" in str(listing.get_option_at_index(0).prompt)
        assert "001.png [mask]" in str(listing.get_option_at_index(1).prompt)
        caption = dialog.query_one("#caption", Input)
        assert caption.value == "a red ball on a sofa"  # the first image is highlighted
        listing.highlighted = 1  # 001.png: no caption, an alpha mask
        await wait_for(pilot, lambda: dialog.current == "001.png", 5, "the highlight")
        preview = dialog.query_one("#image-preview", ImagePreview)
        await wait_for(pilot, lambda: preview.path is not None and preview.path.name.endswith("001.png"), 5,
                       "the overlay")
        shown = np.asarray(Image.open(preview.path)).astype(int)
        plain = np.asarray(Image.open(annotations.mask_of(home / "concepts/ball/images/001.png").parent.parent /
                                      "images" / "001.png")).astype(int)
        assert (shown[:, 40:] == plain[:, 40:]).all() and (shown[:, :40] != plain[:, :40]).any()  # tinted
        assert caption.value == ""
        caption.value = "in the garden"
        await pilot.pause()
        assert "001.png [mask]  in the garden" in str(listing.get_option_at_index(1).prompt)
        listing.highlighted = 0
        await wait_for(pilot, lambda: dialog.current == "000.png", 5, "the highlight")
        caption.value = "x" * 1001
        dialog.query_one("#ok", Button).press()
        error = lambda: str(dialog.query_one("#error").render())  # noqa: E731
        await wait_for(pilot, lambda: "1,001 characters" in error(), 10, "the refusal")
        assert annotations.captions_of(Library(home).get("ball").images)["000.png"] == "a red ball on a sofa"
        caption.value = ""  # remove 000's caption
        await wait_for(pilot, lambda: not dialog.query_one("#ok", Button).disabled, 5, "Apply enabled again")
        dialog.query_one("#ok", Button).press()
        await wait_for(pilot, lambda: not isinstance(app.screen, ImagesModal), 20, "the dialog to close")
        assert annotations.captions_of(Library(home).get("ball").images) == {"001.png": "in the garden",
                                                                             "002.png": "beside a window"}
        await wait_for(pilot, lambda: any("Images of ball: 2 captioned" in m for m in notes(app)), 5,
                       f"the notice (have: {notes(app)})")


async def test_the_new_run_form_offers_buckets_masked_loss_ema_and_a1111_templates(tmp_path):
    from engine.store.library import Library
    from helpers import make_images

    home = tmp_path / "home"
    Library(home).add("cat", make_images(tmp_path / "imgs"), "cat")
    templates = tmp_path / "subject_filewords.txt"
    templates.write_text("a photo of a [name], [filewords]\n", encoding="utf-8")
    config = Config(commands={"train": {"ema": 0.99, "buckets": True, "masked-loss": True}}, path=tmp_path / "c.toml")
    app = offline_app(home, add_sample=False, config=config)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await pilot.pause()
        screen = app.screen
        params = screen.params()
        assert (params["ema"], params["buckets"], params["masked_loss"]) == (0.99, True, True)
        screen.query_one("#buckets", Checkbox).value = False
        fill_train_form(screen, templates=str(templates), ema="")
        params = screen.params()
        assert params["buckets"] is False and "ema" not in params
        assert params["templates"] == ["a photo of a {}, {caption}"]
        fill_train_form(screen, ema="1.5")
        with pytest.raises(ValueError, match="^--ema must be a decay between 0 and 1") as refused:
            screen.params()
        assert refused.value.field == "ema"
        screen.query_one("#buckets", Checkbox).value = True
        fill_train_form(screen, ema="0.9")
        from tistudio.widgets.train_form import TrainForm

        screen.query_one(TrainForm).hidden_params["center_crop"] = True  # the settings file's (no field)
        with pytest.raises(ValueError, match="--buckets keeps each image's aspect ratio") as refused:
            screen.params()
        assert refused.value.field == "buckets"
        assert not any("not a train option" in m for m in notes(app))


async def test_the_new_concept_dialog_takes_a_masks_folder_and_refuses_one_that_matches_nothing(tmp_path):
    """`concept add --masks DIR` in the studio: the New concept dialog's Masks folder."""
    from engine.store import annotations
    from engine.store.library import Library
    from tistudio.screens.library import LibraryScreen
    from tistudio.screens.modals import NewConceptModal

    home = tmp_path / "home"
    images, masks = kohya_folder(tmp_path)
    strangers = tmp_path / "strangers"
    strangers.mkdir()
    Image.new("L", (8, 8), 255).save(strangers / "zzz.png")
    app = offline_app(home, add_sample=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, NewConceptModal) and app.screen, 5, "the dialog")
        for key, value in {"name": "ball", "folder": str(images), "init": "ball", "masks": str(strangers)}.items():
            dialog.query_one(f"#{key}", Input).value = value
        dialog.query_one("#ok", Button).press()
        error = lambda: str(dialog.query_one("#error").render())  # noqa: E731
        await wait_for(pilot, lambda: "no mask there has an image's file name" in error(), 10, "the refusal")
        assert not (home / "concepts" / "ball").exists()  # nothing written
        dialog.query_one("#masks", Input).value = str(masks)
        await wait_for(pilot, lambda: not dialog.query_one("#ok", Button).disabled, 5, "Create enabled again")
        dialog.query_one("#ok", Button).press()
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen), 20, "the dialog to close")
    stored = Library(home).get("ball").images
    assert [annotations.mask_of(p) is not None for p in stored] == [False, True, True]  # alpha, and the folder's


async def test_a_run_goes_to_tensorboard_from_the_train_screen(studio_home, trained_run, tmp_path):
    """`runs export RUN --tensorboard DIR` in the studio: key b on 2 Train, a folder, the event files."""
    from studio import engine_app, online
    from tistudio.screens.modals import TextModal

    app = engine_app(studio_home)
    async with app.run_test(size=SIZE) as pilot:
        await online(app, pilot)
        await pilot.press("2")
        await wait_for(pilot, lambda: trained_run in [j["id"] for j in app.screen.train_jobs()], 20, "the run")
        screen = app.screen
        screen.run_id, screen.pinned = trained_run, True
        a_file = tmp_path / "a-file"
        a_file.write_text("")
        for folder, expected in ((a_file, "a file, not a folder"), (tmp_path / "tb", "Wrote 1 run")):
            await pilot.press("b")
            dialog = await wait_for(pilot, lambda: isinstance(app.screen, TextModal) and app.screen, 5, "the dialog")
            dialog.query_one("#value", Input).value = str(folder)
            dialog.query_one("#ok", Button).press()
            await wait_for(pilot, lambda e=expected: any(e in m for m in notes(app)), 30, f"{expected!r}")
    assert list((tmp_path / "tb" / trained_run).glob("events.out.tfevents.*"))
