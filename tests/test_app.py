"""The studio as a whole, driven by Textual's Pilot: start-up (no torch, fast), the keys, help and
the palette, themes and image protocols, the status bar, engine trouble, typed changes.  Each
screen has its own file: test_app_library, _train, _generate, _metrics, _study, _gallery."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from textual.widgets import Input

from studio import ROOT, SIZE, notes, offline_app, wait_for
from tistudio.app import StudioApp
from tistudio.config import Config
from tistudio.screens.generate import GenerateScreen
from tistudio.screens.help import HelpScreen
from tistudio.screens.library import LibraryScreen
from tistudio.screens.metrics import MetricsScreen
from tistudio.screens.modals import NewConceptModal
from tistudio.screens.train import TrainScreen

pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")


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


async def test_engine_trouble_is_a_notification_or_a_dialog_never_a_crash(tmp_path):
    from tistudio.messages import BridgeNotice
    from tistudio.screens.modals import MessageModal

    app = offline_app(tmp_path / "home")
    async with app.run_test(size=(80, 24)) as pilot:
        app.bridge.submit("train", "sample", {"steps": 1})  # no engine connected
        await wait_for(pilot, lambda: any("not connected" in m for m in notes(app)), 5,
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
        assert any("train sample queued: 20260101-000000-cd34" in m for m in notes(app))


def test_changes_reach_the_screens_typed_and_once():
    from tistudio.messages import Changes, JobsChanged, LibraryChanged, RunChanged, RunSubmitted

    changes = Changes({RunChanged("a"), RunChanged("a"), RunChanged("b"), RunSubmitted("r1", "train", "train"),
                       JobsChanged(), JobsChanged()})
    assert len(changes.items) == 4  # equal changes are one
    assert changes.any(JobsChanged) and changes.any(LibraryChanged, RunChanged) and not changes.any(LibraryChanged)
    assert Changes(everything=True).any(LibraryChanged)
    assert sorted(c.run_id for c in changes.of(RunChanged)) == ["a", "b"]
    assert [(c.run_id, c.origin) for c in changes.of(RunSubmitted)] == [("r1", "train")]


def test_textual_css_is_parsed_once_per_process_and_per_theme():
    """tistudio.css_cache: a stylesheet parsed again (a screen's first visit, another App) reuses
    the rules, the theme's variables are part of the key, and a syntax error raises each time."""
    from textual.css.stylesheet import Stylesheet
    from textual.css.tokenizer import TokenError

    from tistudio import css_cache

    assert css_cache.install() and css_cache.install()  # once, then already

    def rules(css: str, accent: str):
        sheet = Stylesheet(variables={"accent": accent})
        sheet.add_source(css, read_from=("test_app.py", "css-cache"))
        sheet.parse()
        return sheet.rules

    css = "Label { color: $accent; }"
    first, again, other = rules(css, "red"), rules(css, "red"), rules(css, "blue")
    assert again[0] is first[0]
    assert "#0000FF" in other[0].css and "#FF0000" in first[0].css
    for _ in range(2):
        with pytest.raises(TokenError):
            rules("Label { color: ", "red")


async def test_the_footer_is_rebuilt_only_when_its_keys_change(tmp_path):
    """Tab through the Train form: the footer shows each widget's keys (a text field hides the
    screen's letter keys), and is rebuilt when they change, not at every focus move."""
    from textual.widgets._footer import FooterKey

    from tistudio.widgets.footer import StudioFooter

    app = offline_app(tmp_path / "home")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        footer = await wait_for(pilot, lambda: app.screen.query(StudioFooter).first(), 5, "2 Train's footer")
        await pilot.pause(0.3)
        rebuilds, recompose = [], footer.recompose

        async def counted():
            rebuilds.append(app.focused)
            await recompose()

        footer.recompose = counted
        shown, changes = [], 0
        for _ in range(8):
            await pilot.press("tab")
            await pilot.pause(0.1)
            keys = [key.key for key in footer.query(FooterKey)]
            changes += bool(shown) and keys != shown[-1]
            shown.append(keys)
        assert any("s" in keys for keys in shown) and any("s" not in keys for keys in shown)
        assert len(rebuilds) == changes < len(shown) - 1, (rebuilds, shown)


async def test_a_poll_that_brings_nothing_new_redraws_nothing(tmp_path):
    """An idle engine answers every poll alike: the studio publishes no change for it and the
    status bar keeps its line (each redraw of it lays the screen out again); news still shows."""
    import copy

    from tistudio.messages import EngineSnapshot, EngineStateChanged, JobsChanged, StatusChanged
    from tistudio.widgets.statusbar import StatusBar

    gib = 1024 ** 3
    status = {"device": {"device": "cuda:0", "vram_used_device": gib, "vram_total": 8 * gib}}
    jobs = [{"id": "20260101-000000-ab12", "kind": "train", "concept": "sample", "status": "done"}]
    app = offline_app(tmp_path / "home", add_sample=False)
    async with app.run_test(size=SIZE) as pilot:
        # the offline studio's own look at the disk first (a snapshot of no status), then ours
        await wait_for(pilot, lambda: not any(w.name == "engine-offline" for w in app.workers if w.is_running), 5,
                       "the studio's offline snapshot")
        await pilot.pause(0.2)
        app.post_message(EngineSnapshot(copy.deepcopy(status), copy.deepcopy(jobs)))
        bar = app.screen.query_one(StatusBar)
        await wait_for(pilot, lambda: "1.0 GiB / 8.0 GiB" in str(bar.render()), 5, "the first poll shown")
        published, updates, update = [], [], bar.update
        app.changed.subscribe(app.screen, published.append)
        bar.update = lambda *a, **k: updates.append(a) or update(*a, **k)
        for _ in range(3):  # the same answer, as new objects each time
            app.post_message(EngineSnapshot(copy.deepcopy(status), copy.deepcopy(jobs)))
            await pilot.pause(0.1)
        assert not [c for c in published if isinstance(c, (StatusChanged, JobsChanged))] and not updates
        status["device"]["vram_used_device"] = 2 * gib
        app.post_message(EngineSnapshot(copy.deepcopy(status), copy.deepcopy(jobs)))
        await wait_for(pilot, lambda: "2.0 GiB / 8.0 GiB" in str(bar.render()), 5, "the next figure")
        assert [type(c) for c in published] == [StatusChanged] and len(updates) == 1
        app.post_message(EngineStateChanged("online", "pid 1"))  # the engine's mark takes the theme's colour
        await wait_for(pilot, lambda: "engine: online" in str(bar.render()), 5, "the engine online")
        shown = len(updates)
        app.theme = "tistudio-light"  # no poll brings news, yet the line takes the new theme's colours
        await wait_for(pilot, lambda: len(updates) == shown + 1, 5, "the status bar in the new theme")
