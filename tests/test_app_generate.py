"""3 Generate in the studio: the form (size, sampler, batch, negative prompt, pins), completion of
tokens and paths; against the real engine: SD and SD+TI side by side."""

from __future__ import annotations

import pytest
from textual.widgets import Input, Select, Static

from helpers import make_images
from studio import ROOT, SIZE, engine_app, offline_app, online, wait_for
from tistudio.screens.generate import GenerateScreen

pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")


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
