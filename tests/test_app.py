"""The studio, driven by Textual's Pilot.

The engine tests run the REAL engine on builtin:tiny (one engine per module, under a
short /tmp home): create a concept through the form, train and watch the loss chart get
points, quit mid-run and reopen to see the whole history, cancel and resume, generate,
evaluate.  The rest need no engine: keys, help, palette, themes, settings, start-up time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from textual.widgets import Button, DataTable, Input, Select, Static

from helpers import kill_engines, make_images
from tistudio.app import StudioApp
from tistudio.config import Config
from tistudio.screens.generate import GenerateScreen
from tistudio.screens.help import HelpScreen
from tistudio.screens.library import LibraryScreen
from tistudio.screens.metrics import MetricsScreen
from tistudio.screens.modals import ConfirmModal, NewConceptModal, TextModal
from tistudio.screens.train import TrainScreen
from tistudio.widgets.charts import LossChart, VectorChart

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")
SIZE = (100, 30)


async def wait_for(pilot, predicate, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await pilot.pause(step)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def offline_app(home, **kwargs) -> StudioApp:
    return StudioApp(home, "builtin:tiny", engine=False, image_protocol="halfblock", theme="tistudio-dark",
                     **kwargs)


# ---------------------------------------------------------------------------
# Start-up: no torch, fast


def test_importing_the_studio_does_not_import_torch():
    code = "import tistudio.app, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_the_studio_reaches_its_first_screen_quickly_and_never_imports_torch(tmp_path):
    """Import + mount in a fresh process, then wait for the tokenizer too: still no torch.  Timed in
    the process's own CPU seconds, so a machine busy with other work does not count against it."""
    script = f"""
import asyncio, sys, time
t0 = time.process_time()
from tistudio.app import StudioApp
async def main():
    app = StudioApp({str(tmp_path / 'home')!r}, engine=False, image_protocol='halfblock')
    async with app.run_test(size=(80, 24)) as pilot:
        while app.first_screen_at is None:
            await pilot.pause(0.01)
        first = time.process_time() - t0
        assert type(app.screen).__name__ == 'LibraryScreen', app.screen
        for _ in range(300):
            if app.tokenizer is not None:
                break
            await pilot.pause(0.05)
        assert app.tokenizer is not None, 'tokenizer never loaded'
        print(f'FIRST_SCREEN {{first:.3f}}')
asyncio.run(main())
assert 'torch' not in sys.modules, 'torch was imported'
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120, capture_output=True,
                         text=True, env={**os.environ, "TISTUDIO_CONFIG_DIR": str(tmp_path / "cfg")})
    first = float(out.stdout.split("FIRST_SCREEN")[1].split()[0])
    print(f"first screen after {first:.2f} CPU-s (import + mount)")
    assert first < 3.0, f"the studio took {first:.2f} CPU-s to show its first screen"


# ---------------------------------------------------------------------------
# Keys, help, palette (no engine)


async def test_keys_1_to_5_switch_screens_but_not_while_typing(tmp_path):
    from tistudio.screens.gallery import GalleryScreen

    app = offline_app(tmp_path / "home")
    async with app.run_test(size=(80, 24)) as pilot:
        assert isinstance(app.screen, LibraryScreen)
        for key, screen in (("2", TrainScreen), ("3", GenerateScreen), ("4", MetricsScreen), ("5", GalleryScreen),
                            ("1", LibraryScreen)):
            await pilot.press(key)
            await pilot.pause()
            assert isinstance(app.screen, screen), (key, app.screen)
        await pilot.press("3", "p")  # p: into the prompt field
        prompt = app.screen.query_one("#prompt", Input)
        assert app.screen.focused is prompt
        await pilot.press("1", "2", "q")
        assert isinstance(app.screen, GenerateScreen) and prompt.value.endswith("12q")
        await pilot.press("escape", "4")
        await pilot.pause()
        assert isinstance(app.screen, MetricsScreen)


async def test_help_and_the_command_palette_list_every_action(tmp_path):
    app = offline_app(tmp_path / "home")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("2")  # keys 1-5 do nothing under a modal
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, LibraryScreen)
        titles = {c.title for c in app.get_system_commands(app.screen)}
        for wanted in ("Screen: Library", "Screen: Train", "Screen: Generate", "Screen: Metrics", "Screen: Gallery",
                       "Library: inspect word", "Metrics: initializer-word experiment", "Metrics: seed experiment",
                       "Metrics: regulariser experiment", "Metrics: synthesis batches", "Metrics: next view",
                       "Gallery: refresh",
                       "Library: new concept", "Library: import embedding", "Library: export concept",
                       "Library: rename concept", "Library: delete concept", "Library: concept images",
                       "Train: start run",
                       "Train: resume run", "Train: cancel run", "Generate: generate images",
                       "Metrics: evaluate concept", "Metrics: steps experiment", "Theme: tistudio-dark",
                       "Theme: tistudio-light", "Images: auto", "Images: kitty", "Images: sixel",
                       "Images: halfblock", "Help"):
            assert wanted in titles, wanted
        # a palette command runs its screen's action
        palette_new = next(c for c in app.get_system_commands(app.screen) if c.title == "Library: new concept")
        await pilot.press("3")
        await app._screen_action("library", "new_concept")
        await pilot.pause()
        assert isinstance(app.screen, NewConceptModal) and callable(palette_new.callback)
        await pilot.press("escape")


async def test_themes_load_from_files_switch_and_persist(tmp_path):
    from tistudio.themes import load_themes

    themes, problems = load_themes()
    assert problems == []
    by_name = {t.name: t for t in themes}
    assert any(t.dark for t in themes) and any(not t.dark for t in themes)
    assert {"tistudio-dark", "tistudio-light"} <= set(by_name)

    app = StudioApp(tmp_path / "home", engine=False, image_protocol="halfblock", add_sample=False)
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.theme == "tistudio-dark"  # the default
        light = next(c for c in app.get_system_commands(app.screen) if c.title == "Theme: tistudio-light")
        light.callback()
        await pilot.pause()
        assert app.theme == "tistudio-light"
    assert Config.load().theme == "tistudio-light"
    again = StudioApp(tmp_path / "home", engine=False, image_protocol="halfblock", add_sample=False)
    async with again.run_test(size=(80, 24)):
        assert again.theme == "tistudio-light"


def test_a_broken_theme_file_is_skipped_with_a_reason(tmp_path):
    from tistudio.themes import load_themes

    (tmp_path / "bad.toml").write_text('name = "bad"\nprimary = "not a colour"\n')
    (tmp_path / "worse.toml").write_text("this is not toml")
    (tmp_path / "good.toml").write_text('name = "good"\nprimary = "#112233"\ndark = false\n')
    themes, problems = load_themes([tmp_path])
    assert [t.name for t in themes] == ["good"] and len(problems) == 2


def test_image_protocol_comes_from_env_then_config(tmp_path, monkeypatch):
    from tistudio.widgets.images import image_class

    path = tmp_path / "config.toml"
    path.write_text('image_protocol = "sixel"\ntheme = "tistudio-light"\nother = 1\n')
    config = Config.load(path)
    assert config.image_protocol == "sixel" and config.theme == "tistudio-light"
    assert config.effective_protocol({}) == "sixel"
    assert config.effective_protocol({"TISTUDIO_IMAGE_PROTOCOL": "halfblock"}) == "halfblock"
    assert config.effective_protocol({"TISTUDIO_IMAGE_PROTOCOL": "bogus"}) == "sixel"
    config.image_protocol = "kitty"
    config.save()
    assert "other = 1" in path.read_text() and Config.load(path).image_protocol == "kitty"
    path.write_text('image_protocol = "nonsense"\n')
    assert Config.load(path).problem and Config.load(path).image_protocol == "auto"
    import textual_image.widget as tiw

    assert image_class("halfblock") is tiw.HalfcellImage
    assert image_class("kitty") is tiw.TGPImage
    assert image_class("sixel") is tiw.SixelImage


async def test_the_status_bar_names_the_models_family(tmp_path):
    from tistudio.widgets.statusbar import StatusBar

    app = StudioApp(tmp_path / "home", "builtin:sdxl-tiny", engine=False, image_protocol="halfblock",
                    add_sample=False)
    async with app.run_test(size=(100, 24)) as pilot:
        bar = app.screen.query_one(StatusBar)
        await wait_for(pilot, lambda: "│  SDXL  │" in str(bar.render()), 10, "the family in the status bar")
        assert "model: builtin:sdxl-tiny (SDXL)" in app.describe_settings()


async def test_a_missing_theme_is_said_not_silently_replaced(tmp_path):
    app = StudioApp(tmp_path / "home", engine=False, image_protocol="halfblock", add_sample=False,
                    theme="no-such-theme")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert app.theme == "tistudio-dark"
        warning = next(m for severity, m in app.notices if "no-such-theme" in m)
        assert "was not found in" in warning and "using tistudio-dark" in warning
    assert Config.load().theme == "tistudio-dark"  # the config file is not rewritten by the fallback


async def test_vram_per_device_when_the_engine_has_several_workers(tmp_path):
    from tistudio.messages import EngineSnapshot
    from tistudio.widgets.statusbar import StatusBar

    gib = 1024 ** 3
    workers = [{"worker": 0, "device": "cuda:0", "state": "running", "job": "20260101-000000-ab12", "kind": "train",
                "concept": "cat", "steps_per_s": 3.5, "memory": {"vram_allocated": 2 * gib, "vram_total": 8 * gib}},
               {"worker": 1, "device": "cuda:1", "state": "idle", "job": None,
                "memory": {"vram_used_device": 0.5 * gib, "vram_total": 8 * gib}}]
    app = offline_app(tmp_path / "home")
    async with app.run_test(size=(160, 30)) as pilot:
        await pilot.press("2")
        await pilot.pause()
        devices = app.screen.query_one("#vram-devices", Static)
        assert not devices.display  # one device (or an engine without workers): nothing more to say
        app.post_message(EngineSnapshot({"workers": workers, "device": {"device": "cuda:0"}}, None))
        bar = app.screen.query_one(StatusBar)
        await wait_for(pilot, lambda: "cuda:0 2.0 GiB / 8.0 GiB · cuda:1 512 MiB / 8.0 GiB" in str(bar.render()), 5,
                       "each device in the status bar")
        await wait_for(pilot, lambda: devices.display, 5, "the devices line on 2 Train")
        text = str(devices.render())
        assert "cuda:0 2.0 GiB / 8.0 GiB (train cat 20260101-000000-ab12 3.50 it/s)" in text
        assert "cuda:1 512 MiB / 8.0 GiB (idle)" in text
        app.post_message(EngineSnapshot({"device": {"device": "cuda:0", "vram_used_device": gib,
                                                    "vram_total": 8 * gib}}, None))
        await wait_for(pilot, lambda: not devices.display, 5, "the line gone with the workers")
        assert "device: cuda:0  │  VRAM: 1.0 GiB / 8.0 GiB" in str(bar.render())


async def test_the_image_protocol_switches_from_the_palette_and_is_remembered(tmp_path):
    import textual_image.widget as tiw

    app = offline_app(tmp_path / "home")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen.query_one("#thumbs ImagePreview .image"), tiw.HalfcellImage)
        command = next(c for c in app.get_system_commands(app.screen) if c.title == "Images: sixel")
        command.callback()
        await wait_for(pilot, lambda: all(isinstance(w, tiw.SixelImage)
                                          for w in app.screen.query("#thumbs ImagePreview .image")), 5,
                       "the thumbnails drawn as sixels")
        app.set_image_protocol("halfblock")
        await wait_for(pilot, lambda: all(isinstance(w, tiw.HalfcellImage)
                                          for w in app.screen.query("#thumbs ImagePreview .image")), 5,
                       "the thumbnails drawn as half-blocks")
    assert Config.load().image_protocol == "halfblock"


async def test_the_sample_concept_is_offered_once_on_an_empty_library(tmp_path):
    from engine.store.library import Library
    from tistudio.samples import SAMPLE_DIR

    shipped = sorted(SAMPLE_DIR.glob("*.png"))
    assert len(shipped) >= 4
    home = tmp_path / "home"
    app = offline_app(home)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        table = app.screen.query_one("#concepts", DataTable)
        assert table.row_count == 1
        assert len(app.screen.query("#thumbs ImagePreview")) == len(shipped)
    concept = Library(home).get("sample")
    assert concept.init == "toy" and len(concept.images) == len(shipped)
    Library(home).delete("sample")
    async with offline_app(home).run_test(size=SIZE):
        assert Library(home).list() == []  # not forced on the user again


async def test_rename_and_delete_ask_and_change_the_library(tmp_path):
    from engine.store.library import Library

    home = tmp_path / "home"
    Library(home).add("cat", make_images(tmp_path / "imgs"), "cat")
    app = offline_app(home, add_sample=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("r")
        await pilot.pause()
        assert isinstance(app.screen, TextModal)
        app.screen.query_one("#value", Input).value = "kitty"
        await pilot.press("enter")
        await pilot.pause()
        assert [c.name for c in Library(home).list()] == ["kitty"]
        assert Library(home).get("kitty").token == "<kitty>"
        await wait_for(pilot, lambda: app.screen.query_one("#concepts", DataTable).get_row_at(0)[0] == "kitty",
                       5, "the table to show the new name")
        await pilot.press("d")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmModal)
        await pilot.press("escape")  # cancel: nothing happens
        assert Library(home).list()
        await pilot.press("d")
        await pilot.pause()
        await pilot.click("#ok")
        await pilot.pause()
        assert Library(home).list() == []


async def test_images_of_a_concept_are_added_and_removed_in_the_library(tmp_path):
    from engine.store.library import Library
    from tistudio.screens.modals import ImagesModal

    home = tmp_path / "home"
    Library(home).add("imp", None, "cat")  # as an imported embedding arrives: no images
    more = make_images(tmp_path / "more", count=2, seed=1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    app = offline_app(home, add_sample=False)
    async with app.run_test(size=SIZE) as pilot:
        table = app.screen.query_one("#concepts", DataTable)
        assert table.get_row_at(0)[5] == "0"  # Imgs (after Vec)
        assert "press e to add some" in str(app.screen.query_one("#detail-text", Static).render())
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, ImagesModal), 5, "the images dialog")
        app.screen.query_one("#add", Input).value = f"{more}, {broken}"
        await pilot.click("#ok")
        error = lambda: str(app.screen.query_one("#error", Static).render())  # noqa: E731
        await wait_for(pilot, lambda: "broken.png" in error(), 60, "the refusal")
        assert Library(home).get("imp").images == []  # nothing written
        app.screen.query_one("#add", Input).value = str(more)
        # The refusal's text re-flows the dialog, so a click by position can land where Apply was a
        # layout ago (seen under load): press the button itself, as Enter on it would.
        await wait_for(pilot, lambda: not app.screen.query_one("#ok", Button).disabled, 5, "Apply enabled again")
        app.screen.query_one("#ok", Button).press()
        await wait_for(pilot, lambda: not isinstance(app.screen, ImagesModal), 60, "the dialog to close")
        assert [p.name for p in Library(home).get("imp").images] == ["000.png", "001.png"]
        await wait_for(pilot, lambda: table.get_row_at(0)[5] == "2", 5, "the new count")
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, ImagesModal), 5, "the images dialog")
        app.screen.query_one("#remove").select("000.png")
        await pilot.click("#ok")
        await wait_for(pilot, lambda: not isinstance(app.screen, ImagesModal), 60, "the dialog to close")
        assert [p.name for p in Library(home).get("imp").images] == ["001.png"]
        assert any("Images of imp: 2 added" in m for m in _notes(app))
        assert any("Images of imp: 1 removed" in m for m in _notes(app))


async def test_the_train_form_rejects_bad_numbers_with_a_notification(tmp_path):
    app = offline_app(tmp_path / "home")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await pilot.pause()
        app.screen.query_one("#steps", Input).value = "lots"
        await pilot.press("s")
        await pilot.pause()
        assert any("Steps must be a whole number" in m for m in _notes(app))


async def test_the_train_form_offers_every_training_option(tmp_path):
    from engine.store.library import Library
    from engine.store.runs import create_run, set_status

    home = tmp_path / "home"
    Library(home).add("cat", make_images(tmp_path / "imgs"), "cat")
    run_dir = create_run(home, {"kind": "train", "concept": "cat", "params": {}})
    (run_dir / "embeddings").mkdir()
    (run_dir / "embeddings" / "learned_embeds-steps-8.safetensors").write_bytes(b"")
    set_status(run_dir, "failed")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of {}\n# a comment\n\na {} on a table\n")
    embedding = tmp_path / "other.safetensors"
    embedding.write_bytes(b"")
    app = offline_app(home, add_sample=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await pilot.pause()
        screen = app.screen
        defaults = screen.params()
        assert defaults["grad_accum"] == 1 and defaults["vectors"] == 1 and defaults["low_vram"] is False
        assert defaults["compile"] == "off" and defaults["weight_decay"] == 0.01
        assert defaults["regularize"] == "none" and defaults["reg_weight"] == 0.0
        assert not {"resolution", "templates", "device", "init_from", "keep_checkpoints"} & set(defaults)
        await pilot.press("l")  # --low-vram, one key away
        await pilot.pause()
        assert screen.params()["low_vram"] is True and any("Low VRAM on" in m for m in _notes(app))
        fill_train_form(screen, batch_size=2, grad_accum=4, weight_decay="0", vectors=3, keep_checkpoints=2,
                        resolution=256, templates=str(templates), device="cuda:1",
                        init_from=f"cat@{run_dir.name}:8")
        screen.query_one("#compile", Select).value = "reduce-overhead"
        screen.query_one("#regularize", Select).value = "directional"
        await pilot.pause()
        assert screen.params()["regularize"] == "directional"
        fill_train_form(screen, reg_weight="0.25")
        assert screen.params()["reg_weight"] == 0.25
        fill_train_form(screen, reg_weight="-1")
        await pilot.pause()
        with pytest.raises(ValueError, match="^--reg-weight must be 0 or a positive number$") as refused:
            screen.params()  # the engine's own words (engine.settings.jobs), about the form's field
        assert refused.value.field == "reg_weight"
        screen.action_start()  # Start (s): refused on the field itself, nothing submitted
        await pilot.pause()
        field = screen.query_one("#reg_weight", Input)
        assert field.has_class("-refused") and field.tooltip == str(refused.value) and screen.focused is field
        fill_train_form(screen, reg_weight="")
        await pilot.pause()
        assert not field.has_class("-refused")
        assert "8 (2×4)" in str(screen.query_one("#effective-batch", Static).render())
        params = screen.params()
        assert {k: params[k] for k in ("batch_size", "grad_accum", "weight_decay", "vectors", "keep_checkpoints",
                                       "resolution", "templates", "device", "init_from", "compile", "low_vram")} == {
            "batch_size": 2, "grad_accum": 4, "weight_decay": 0.0, "vectors": 3, "keep_checkpoints": 2,
            "resolution": 256, "templates": ["a photo of {}", "a {} on a table"], "device": "cuda:1",
            "init_from": f"cat@{run_dir.name}:8", "compile": "reduce-overhead", "low_vram": True}
        fill_train_form(screen, init_from=str(embedding))
        assert screen.params()["init_from"] == str(embedding.resolve())
        bad = {"init_from": "cat@nope:3", "resolution": "100", "weight_decay": "-1", "grad_accum": "0",
               "templates": str(tmp_path / "missing.txt"), "vectors": "0", "keep_checkpoints": "0"}
        for key, value in bad.items():
            fill_train_form(screen, **{key: value})
            with pytest.raises(ValueError) as refused:
                screen.params()
            assert getattr(refused.value, "field", key) == key, (key, refused.value)
            fill_train_form(screen, **{key: ""} if key in ("init_from", "resolution", "templates",
                                                           "keep_checkpoints") else {key: "1"})
        templates.write_text("a photo of {} and {}\n")
        fill_train_form(screen, templates=str(templates))
        with pytest.raises(ValueError, match="exactly one"):
            screen.params()


async def test_the_train_form_starts_from_the_settings_files_train_table(tmp_path):
    config = Config(commands={"train": {"steps": 1500, "low-vram": True, "regularize": "init-l2", "reg_weight": 0.5,
                                        "lr-schedule": "cosine", "batch_size": 2, "grad-accum": 3, "flip": 0.0,
                                        "center-crop": True, "seeds": [1, 2], "compile": "sometimes",
                                        "deterministic": True}},
                    path=tmp_path / "config.toml")
    app = offline_app(tmp_path / "home", config=config)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await pilot.pause()
        params = app.screen.params()
        assert {k: params[k] for k in ("steps", "low_vram", "regularize", "reg_weight", "lr_schedule", "batch_size",
                                       "grad_accum", "flip_p", "center_crop", "compile")} == {
            "steps": 1500, "low_vram": True, "regularize": "init-l2", "reg_weight": 0.5, "lr_schedule": "cosine",
            "batch_size": 2, "grad_accum": 3, "flip_p": 0.0, "center_crop": True, "compile": "off"}
        assert params["deterministic"] is True  # a checkbox, like Low VRAM
        assert "seeds" not in params
        assert "6 (2×3)" in str(app.screen.query_one("#effective-batch", Static).render())
        warning = next(m for m in _notes(app) if "[train]" in m)
        assert "seeds is for `tistudio train` only" in warning and "compile = 'sometimes'" in warning


async def test_the_generate_form_takes_size_sampler_batch_negative_and_pins(tmp_path):
    from engine.store.library import Library
    from engine.store.runs import create_run, set_status

    home = tmp_path / "home"
    Library(home).add("cat", make_images(tmp_path / "imgs"), "cat")
    run_dir = create_run(home, {"kind": "train", "concept": "cat", "params": {}})
    (run_dir / "learned_embeds.safetensors").write_bytes(b"")
    (run_dir / "embeddings").mkdir()
    (run_dir / "embeddings" / "learned_embeds-steps-8.safetensors").write_bytes(b"")
    set_status(run_dir, "done")
    app = offline_app(home, add_sample=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("3")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, GenerateScreen)
        defaults = screen.params()
        assert defaults["sampler"] == "dpm++2m" and defaults["uses"] == [] and defaults["negative"] == ""
        assert defaults["batch_size"] == 4 and "width" not in defaults and "height" not in defaults
        screen.query_one("#uses", Input).value = "cat@"
        await pilot.pause()
        assert await screen.query_one("#uses", Input).suggester.get_suggestion("cat@") == f"cat@{run_dir.name}"

        def fill(**values):
            for key, value in values.items():
                screen.query_one(f"#{key}", Input).value = str(value)

        fill(prompt="a photo of <cat>", negative="blurry, <cat>", width=512, height=768, batch_size=2,
             uses=f"cat@{run_dir.name}:8")
        screen.query_one("#sampler", Select).value = "euler-a"
        params = screen.params()
        assert {k: params[k] for k in ("prompt", "negative", "width", "height", "batch_size", "sampler", "uses")} == {
            "prompt": "a photo of <cat>", "negative": "blurry, <cat>", "width": 512, "height": 768, "batch_size": 2,
            "sampler": "euler-a", "uses": [f"cat@{run_dir.name}:8"]}
        for key, value, problem in (("uses", "cat@nope:8", "no saved embedding"),
                                    ("uses", f"cat@{run_dir.name}, cat@{run_dir.name}:8", "pinned twice"),
                                    ("width", "500", "multiple of 8"), ("batch_size", "0", "at least 1")):
            fill(**{key: value})
            with pytest.raises(ValueError, match=problem):
                screen.params()
            fill(uses="", width="", batch_size=4)


async def test_engine_trouble_is_a_notification_or_a_dialog_never_a_crash(tmp_path):
    from tistudio.messages import BridgeNotice
    from tistudio.screens.modals import MessageModal

    app = offline_app(tmp_path / "home")
    async with app.run_test(size=(80, 24)) as pilot:
        app.bridge.submit("train", "sample", {"steps": 1})  # no engine connected
        await wait_for(pilot, lambda: any("not connected" in m for m in _notes(app)), 5,
                       "the warning")
        app.post_message(BridgeNotice("the engine did not start", details="exit code 1\nTraceback …"))
        await wait_for(pilot, lambda: isinstance(app.screen, MessageModal), 5, "the dialog")
        await pilot.press("escape")
        assert isinstance(app.screen, LibraryScreen) and app.is_running


async def test_a_submitted_run_is_followed_by_the_screen_that_asked_for_it(tmp_path):
    from tistudio.messages import JobSubmitted

    app = offline_app(tmp_path / "home")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, TrainScreen)
        app.post_message(JobSubmitted("20260101-000000-ab12", "generate", None, "generate"))
        await pilot.pause(0.5)
        assert screen.run_id != "20260101-000000-ab12"  # the Generate screen's, not ours
        app.post_message(JobSubmitted("20260101-000000-cd34", "train", "sample", "train"))
        await wait_for(pilot, lambda: screen.run_id == "20260101-000000-cd34", 5, "the train screen to follow it")
        assert any("train sample queued: 20260101-000000-cd34" in m for m in _notes(app))


def test_changes_reach_the_screens_typed_and_once():
    from tistudio.messages import Changes, JobsChanged, LibraryChanged, RunChanged, RunSubmitted

    changes = Changes({RunChanged("a"), RunChanged("a"), RunChanged("b"), RunSubmitted("r1", "train", "train"),
                       JobsChanged(), JobsChanged()})
    assert len(changes.items) == 4  # equal changes are one
    assert changes.any(JobsChanged) and changes.any(LibraryChanged, RunChanged) and not changes.any(LibraryChanged)
    assert Changes(everything=True).any(LibraryChanged)
    assert sorted(c.run_id for c in changes.of(RunChanged)) == ["a", "b"]
    assert [(c.run_id, c.origin) for c in changes.of(RunSubmitted)] == [("r1", "train")]


def test_a_run_track_keeps_the_header_and_the_vectors_figures_and_a_resume_replaces_them():
    from tistudio.state import RunTrack
    from tistudio.widgets.charts import vector_summary

    header = {"type": "train", "seq": 3, "family": "sdxl", "vectors": 2, "widths": [768, 1280], "batch_size": 2,
              "grad_accum": 2, "effective_batch": 4, "regularize": "init-l2", "reg_weight": 0.5,
              "vocab_norms": [0.4, 0.9]}

    def step(seq, s, norm, reg=None):
        event = {"type": "step", "seq": seq, "step": s, "steps": 8, "loss": 0.1, "norm": norm, "cos_init": 1 - s / 10,
                 "norms": [norm, 2 * norm], "cos_inits": [1 - s / 10, 1 - s / 20]}
        return {**event, "reg": reg} if reg is not None else event

    track = RunTrack("r")
    track.apply([{"type": "status", "seq": 1, "status": "running"}, header,
                 step(4, 2, 0.4, 0.01), step(5, 4, 0.5, 0.02), step(6, 6, 0.6, 0.03)])
    assert track.header["family"] == "sdxl" and track.header["vocab_norms"] == [0.4, 0.9]
    assert track.vec_steps == [2, 4, 6] and track.norm == [0.4, 0.5, 0.6] and track.reg == [0.01, 0.02, 0.03]
    assert track.norms == [0.6, 1.2] and track.cos_inits == pytest.approx([0.4, 0.7])
    # resumed from step 4: steps 4 and 6 are logged again, with other figures
    track.apply([step(7, 4, 0.45, 0.5), step(8, 6, 0.55)])
    assert track.xs == [2, 4, 6] and track.vec_steps == [2, 4, 6] and track.norm == [0.4, 0.45, 0.55]
    assert track.reg_steps == [2, 4] and track.reg == [0.01, 0.5]
    # an older engine's step (no figures) draws the loss alone
    track.apply([{"type": "step", "seq": 9, "step": 8, "loss": 0.2}])
    assert track.xs[-1] == 8 and track.vec_steps[-1] == 6
    assert vector_summary([0.8, 1.8], [0.5, 0.75], 0.4) == "2× vocab · cos 0.50/0.75 · norm 0.8/1.8"
    assert vector_summary([0.8], [float("nan")], None) == "cos – · norm 0.8"


def test_the_run_facts_come_from_the_header_and_else_the_params():
    from tistudio.widgets.run_view import run_facts

    header = {"family": "sd1", "vectors": 1, "batch_size": 1, "grad_accum": 4, "effective_batch": 4,
              "regularize": "init-l2", "reg_weight": 0.5, "init_from": "/x/y/start.safetensors"}
    assert run_facts(header, {"params": {"low_vram": True}}, 0.0123) == [
        "SD 1.x", "1 vector", "batch 1×4 = 4", "reg init-l2 λ 0.5 (penalty 0.0123)", "from start.safetensors",
        "low VRAM"]
    plain = {"family": "sdxl", "vectors": 3, "batch_size": 2, "grad_accum": 1, "effective_batch": 2,
             "regularize": "none"}
    assert run_facts(plain, {}) == ["SDXL", "3 vectors", "batch 2", "reg none"]
    # a run from before headers: what its params and record say
    assert run_facts({}, {"params": {"batch_size": 2, "grad_accum": 2, "vectors": 2},
                          "model": {"family": "sd2"}}) == ["SD 2.x", "2 vectors", "batch 2×2 = 4"]
    assert run_facts({}, {"params": {}}) == []


def test_the_import_and_export_dialogs_answer_with_requests_for_the_cli():
    from tistudio.screens.modals import ExportModal, ExportRequest, ImportRequest

    assert ImportRequest(Path("/x/e.pt")).cli_args() == ["/x/e.pt", "--json"]
    assert ImportRequest(Path("/x/e.pt"), "cat", "<c>", True).cli_args() == [
        "/x/e.pt", "--json", "--name", "cat", "--token", "<c>", "--style"]
    assert ExportRequest(Path("/o.pt"), "a1111", "run1", 8).cli_args("cat") == [
        "cat", "--out", "/o.pt", "--format", "a1111", "--run", "run1", "--step", "8"]
    assert "--step" not in ExportRequest(Path("/o.pt"), "kohya", "run1").cli_args("cat")
    import argparse

    from tistudio.commands.library_cmds import add_commands  # every format `tistudio export` writes is offered

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    export = next(a for a in parser._subparsers._group_actions[0].choices["export"]._actions if a.dest == "format")
    assert [value for _, value in ExportModal.FORMATS] == list(export.choices)


def test_prompt_and_path_completion():
    from tistudio.widgets.forms import complete_path, complete_token

    tokens = ["<sample>", "<robot-copy>", "<Bot>"]
    assert complete_token("a photo of <sa", tokens) == "a photo of <sample>"
    assert complete_token("a photo of (<ro", tokens) == "a photo of (<robot-copy>"
    assert complete_token("a photo of <bo", tokens) == "a photo of <bot>"
    assert complete_token("a photo of <sample>", tokens) is None
    assert complete_token("a photo of ", tokens) is None
    assert complete_path(str(ROOT / "themes" / "tistudio-da")) == str(ROOT / "themes" / "tistudio-dark.toml")
    assert complete_path(str(ROOT / "tistu"), dirs_only=True) == str(ROOT / "tistudio") + "/"


# ---------------------------------------------------------------------------
# Against the real engine (builtin:tiny), one engine for the module


@pytest.fixture(scope="module")
def studio_home():
    path = Path(tempfile.mkdtemp(prefix="tis-app-"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TISTUDIO_ENGINE_IDLE", "120")
        yield path
    kill_engines(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def trained_run(studio_home) -> str:
    """A finished run of the sample concept (16 steps on builtin:tiny, saved at 8 and 16),
    trained once for the tests that need one, whichever of them runs first or alone."""
    from engine.wire.client import call
    from tistudio.samples import SAMPLE_NAME, ensure_sample_concept

    ensure_sample_concept(studio_home, model="builtin:tiny")
    params = {"steps": 16, "log_every": 2, "save_every": 8, "preview_every": 0, "seed": 3, "model": "builtin:tiny"}
    run_id = call("submit", "train", concept=SAMPLE_NAME, params=params, home=studio_home)
    status = call("wait", run_id, home=studio_home)
    assert status == "done", f"the fixture's training run {run_id} ended {status}"
    return run_id


def engine_app(home, **kwargs) -> StudioApp:
    return StudioApp(home, "builtin:tiny", image_protocol="halfblock", theme="tistudio-dark", clip="builtin:tiny",
                     eval_images=2, eval_params={"sample_steps": 2}, poll_seconds=0.5, **kwargs)


async def online(app, pilot):
    await wait_for(pilot, lambda: app.state.engine == "online", 40, "the engine to come online")


def _notes(app) -> list[str]:
    return [message for _, message in app.notices]


def fill_train_form(screen, **values):
    for key, value in values.items():
        screen.query_one(f"#{key}", Input).value = str(value)


async def start_run(app, pilot, screen) -> str:
    """Press s on the Train screen; the id of the run it queued (the screen follows it)."""
    before = {j["id"] for j in app.state.jobs}
    await pilot.press("s")
    return await wait_for(pilot, lambda: screen.run_id not in before and app.state.job(screen.run_id)
                          and screen.run_id, 20, "the new run to be queued")


@pytest.mark.timeout(240)
async def test_create_a_concept_in_the_form_with_a_live_initializer_check(studio_home, tmp_path):
    images = make_images(tmp_path / "robot-pics", count=3)
    app = engine_app(studio_home)
    async with app.run_test(size=SIZE) as pilot:
        await online(app, pilot)
        await wait_for(pilot, lambda: app.tokenizer is not None, 30, "the tokenizer")
        assert app.screen.query_one("#concepts", DataTable).row_count == 1  # the sample
        await pilot.press("n")
        await pilot.pause()
        modal = app.screen
        assert isinstance(modal, NewConceptModal)
        modal.query_one("#init", Input).value = "xylophonesque"
        await pilot.pause()
        assert "splits into" in str(modal.query_one("#init-check", Static).render())
        modal.query_one("#name", Input).value = "bot"
        modal.query_one("#folder", Input).value = str(images)
        modal.query_one("#init", Input).value = "robot"
        await pilot.pause()
        assert "single token" in str(modal.query_one("#init-check", Static).render())
        modal.query_one("#description", Input).value = "a small robot"
        await pilot.click("#ok")
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen), 20, "the form to close")
        table = app.screen.query_one("#concepts", DataTable)
        await wait_for(pilot, lambda: table.row_count == 2, 5, "the new concept in the table")
        assert "Concept bot created." in _notes(app)


@pytest.mark.timeout(300)
async def test_train_streams_loss_and_reopening_shows_the_history_and_follows_live(studio_home):
    app = engine_app(studio_home)
    async with app.run_test(size=SIZE) as pilot:
        await online(app, pilot)
        await pilot.press("2")
        await pilot.pause()
        screen = app.screen
        screen.query_one("#concept", Select).value = "sample"
        fill_train_form(screen, steps=16, log_every=2, save_every=8, preview_every=0, seed=3)
        run_id = await start_run(app, pilot, screen)
        track = await wait_for(pilot, lambda: (t := app.state.tracks.get(run_id)) and len(t.xs) >= 1 and t,
                               120, "the first loss points")
        chart = screen.query_one("#loss", LossChart)
        await wait_for(pilot, lambda: chart._key is not None and chart._key[0] >= 1, 5, "the chart to draw them")
        seen = list(track.xs)
        await pilot.press("q")  # quitting never stops a run
    from engine.wire.client import EngineClient

    async with EngineClient(studio_home) as client:
        status = {j["id"]: j["status"] for j in await client.jobs()}[run_id]
    assert status in ("running", "done"), status

    app = engine_app(studio_home)
    async with app.run_test(size=SIZE) as pilot:
        await online(app, pilot)
        await pilot.press("2")
        screen = app.screen
        await wait_for(pilot, lambda: screen.run_id == run_id, 10, "the train screen to show the run")
        track = await wait_for(pilot, lambda: (t := app.state.tracks.get(run_id)) and t.status == "done" and t,
                               180, "the run to finish")
        assert track.xs == list(range(2, 17, 2))  # the whole history: before the reopen and after
        assert track.xs[: len(seen)] == seen
        await wait_for(pilot, lambda: screen.query_one("#loss", LossChart)._key[0] == len(track.xs), 5,
                       "the chart to show every point")
        title = lambda: str(screen.query_one("#run-title", Static).render())  # noqa: E731
        await wait_for(pilot, lambda: run_id in title() and "done" in title(), 5, "the title to say done")
        # beside the loss: the vector's norm and cosine to its initializer, with the vocabulary's median
        assert track.vec_steps == track.xs and all(n > 0 for n in track.norm)
        assert all(-1 <= c <= 1 for c in track.cos_init) and track.cos_init[0] > track.cos_init[-1]
        assert track.header["family"] == "sd1" and track.header["vectors"] == 1
        assert track.header["vocab_norms"][0] > 0
        vector = screen.query_one("#vector", VectorChart)
        await wait_for(pilot, lambda: vector._key is not None and vector._key[0] == len(track.xs), 5,
                       "the vector chart to show every point")
        assert "× vocab" in vector.border_subtitle and "cos" in vector.border_subtitle
        stats = str(screen.query_one("#run-stats", Static).render())
        assert "SD 1.x" in stats and "1 vector" in stats and "batch 1" in stats and "reg none" in stats


@pytest.mark.timeout(240)
async def test_a_regularised_run_from_the_form_charts_its_vector_and_shows_its_penalty(studio_home):
    app = engine_app(studio_home)
    async with app.run_test(size=SIZE) as pilot:
        await online(app, pilot)
        await pilot.press("2")
        screen = app.screen
        screen.query_one("#concept", Select).value = "sample"
        screen.query_one("#regularize", Select).value = "init-l2"
        fill_train_form(screen, steps=6, log_every=2, save_every=6, preview_every=0, reg_weight="0.5")
        run_id = await start_run(app, pilot, screen)
        track = await wait_for(pilot, lambda: (t := app.state.tracks.get(run_id)) and t.status in ("done", "failed")
                               and t, 120, "the run to end")
        assert track.status == "done", track.error
        assert track.header["regularize"] == "init-l2" and track.header["reg_weight"] == 0.5
        assert track.reg_steps == [2, 4, 6] and all(r >= 0 for r in track.reg)
        stats = lambda: str(screen.query_one("#run-stats", Static).render())  # noqa: E731
        await wait_for(pilot, lambda: "reg init-l2 λ 0.5 (penalty" in stats(), 5, "the regularizer in the stats")
        vector = screen.query_one("#vector", VectorChart)
        await wait_for(pilot, lambda: vector._key is not None and vector._key[0] == 3, 5, "the vector chart")


@pytest.mark.timeout(240)
async def test_cancel_and_resume_from_the_train_screen(studio_home):
    app = engine_app(studio_home)
    async with app.run_test(size=SIZE) as pilot:
        await online(app, pilot)
        await pilot.press("2")
        screen = app.screen
        screen.query_one("#concept", Select).value = "sample"
        fill_train_form(screen, steps=2000, log_every=1, save_every=2, preview_every=0)
        run_id = await start_run(app, pilot, screen)
        await wait_for(pilot, lambda: len(app.state.track(run_id).xs) >= 2, 120, "some steps")
        await pilot.press("c")
        await wait_for(pilot, lambda: (app.state.job(run_id) or {}).get("status") == "cancelled", 30,
                       "the run to be cancelled")
        await pilot.press("r")
        await wait_for(pilot, lambda: (app.state.job(run_id) or {}).get("status") == "running", 60,
                       "the run to resume")
        await pilot.press("c")
        await wait_for(pilot, lambda: (app.state.job(run_id) or {}).get("status") == "cancelled", 30,
                       "the resumed run to be cancelled")
        # the engine's own complaint about a wrong request is a notification, not a crash
        app.bridge.submit("train", "no-such-concept", {"steps": 1})
        await wait_for(pilot, lambda: any("no concept named" in m for m in _notes(app)), 10, "the error")
        assert app.is_running


@pytest.mark.timeout(240)
async def test_export_then_import_through_the_dialogs(studio_home, trained_run, tmp_path):
    from engine.store.library import Library
    from tistudio.screens.modals import ExportModal, ImportModal

    out = tmp_path / "sample-export.safetensors"
    app = engine_app(studio_home)
    async with app.run_test(size=SIZE) as pilot:
        await online(app, pilot)
        table = app.screen.query_one("#concepts", DataTable)
        table.move_cursor(row=[r.name for r in app.screen.rows].index("sample"))
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ExportModal), 5, "the export dialog")
        app.screen.query_one("#out", Input).value = str(out)
        await pilot.click("#ok")
        await wait_for(pilot, lambda: out.is_file() and any("Exported" in m for m in _notes(app)), 90, "the export")
        async def import_it(**fields) -> None:
            await pilot.press("i")
            await wait_for(pilot, lambda: isinstance(app.screen, ImportModal), 5, "the import dialog")
            for key, value in fields.items():
                app.screen.query_one(f"#{key}", Input).value = value
            await pilot.click("#ok")

        # the file's own token is taken by the concept it came from: the CLI's error is a notification
        await import_it(file=str(out), name="robot-copy")
        await wait_for(pilot, lambda: any("already used" in m for m in _notes(app)), 90, "the error")
        await import_it(file=str(out), name="robot-copy", token="<robot-copy>")
        await wait_for(pilot, lambda: any("imported" in m for m in _notes(app)), 90, "the import")
        await wait_for(pilot, lambda: "robot-copy" in [r.name for r in app.screen.rows], 5, "the new row")
    assert Library(studio_home).get("robot-copy").token == "<robot-copy>"


@pytest.mark.timeout(300)
async def test_generate_shows_sd_and_ti_images_with_their_paths(studio_home, trained_run):
    app = engine_app(studio_home)
    async with app.run_test(size=SIZE) as pilot:
        await online(app, pilot)
        await pilot.press("3")
        await wait_for(pilot, lambda: isinstance(app.screen, GenerateScreen), 5, "the Generate screen")
        await pilot.press("p")
        screen = app.screen
        assert isinstance(screen.focused, Input)
        screen.query_one("#prompt", Input).value = "a photo of <sample>"
        for key, value in (("count", 1), ("steps", 2), ("seed", 5)):
            screen.query_one(f"#{key}", Input).value = str(value)
        await pilot.press("enter")

        def shown():
            job = app.state.job(screen.run_id) if screen.run_id else None
            if job and job.get("status") == "failed":
                raise AssertionError(f"generate failed: {job.get('error')}")
            sd = screen.query("#imgs-sd ImagePreview")
            ti = screen.query("#imgs-ti ImagePreview")
            return sd and ti and all(p.path and p.path.is_file() for p in [*sd, *ti])

        await wait_for(pilot, shown, 180, "SD and SD+TI images")
        status = str(screen.query_one("#gen-status", Static).render())
        assert "saved in" in status
        previews = list(screen.query("#imgs-ti ImagePreview"))
        assert previews[0].query(".image")  # a textual-image widget, not the placeholder


@pytest.mark.timeout(300)
async def test_evaluate_fills_table_1(studio_home, trained_run):
    app = engine_app(studio_home)
    async with app.run_test(size=SIZE) as pilot:
        await online(app, pilot)
        app.selected_concept = "sample"
        await pilot.press("4")
        await wait_for(pilot, lambda: isinstance(app.screen, MetricsScreen), 5, "the Metrics screen")
        screen = app.screen
        assert screen.concept() == "sample"
        await pilot.press("e")

        def filled():
            failed = [j for j in app.state.jobs_of("eval", "sample") if j.get("status") == "failed"]
            if failed:
                raise AssertionError(f"eval failed: {failed[-1].get('error')}")
            return screen.query_one("#table1", DataTable).row_count == 3

        await wait_for(pilot, filled, 240, "Table 1")
        table = screen.query_one("#table1", DataTable)
        assert [table.get_row_at(i)[0] for i in range(3)] == ["SD", "SD+TI", "Δ (TI − SD)"]
        assert screen.query_one("#per-prompt", DataTable).row_count >= 1


@pytest.mark.timeout(300)
async def test_the_steps_experiment_draws_the_curve_over_checkpoints(studio_home, trained_run):
    from tistudio.widgets.charts import CurveChart

    app = engine_app(studio_home)
    async with app.run_test(size=SIZE) as pilot:
        await online(app, pilot)
        app.selected_concept = "sample"
        await pilot.press("4")
        await wait_for(pilot, lambda: isinstance(app.screen, MetricsScreen), 5, "the Metrics screen")
        screen = app.screen
        await pilot.press("x")
        chart = screen.query_one("#curve", CurveChart)

        def drawn():
            failed = [j for j in app.state.jobs_of("experiment", "sample") if j.get("status") == "failed"]
            if failed:
                raise AssertionError(f"experiment failed: {failed[-1].get('error')}")
            return chart._key is not None and len(chart._key[0]) >= 2

        await wait_for(pilot, drawn, 240, "the curve")
        assert [p[0] for p in chart._key[0]] == [8, 16]  # the run's saved checkpoints
        experiment = app.state.jobs_of("experiment", "sample")[-1]
        assert (experiment.get("params") or {}).get("run") == trained_run  # the latest finished run
