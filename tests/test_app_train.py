"""2 Train in the studio: the New-run form (every option, the engine's refusals on the field, the
settings file), the run's facts and track; against the real engine: a run streams its loss and
vector, survives the studio closing, cancels and resumes."""

from __future__ import annotations

import pytest
from textual.widgets import Input, Select, Static

from helpers import make_images
from studio import SIZE, engine_app, fill_train_form, notes, offline_app, online, start_run, wait_for
from tistudio.config import Config
from tistudio.widgets.charts import LossChart, VectorChart

pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")


async def test_the_train_form_rejects_bad_numbers_with_a_notification(tmp_path):
    app = offline_app(tmp_path / "home")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await pilot.pause()
        app.screen.query_one("#steps", Input).value = "lots"
        await pilot.press("s")
        await pilot.pause()
        assert any("Steps must be a whole number" in m for m in notes(app))


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
        assert screen.params()["low_vram"] is True and any("Low VRAM on" in m for m in notes(app))
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
        warning = next(m for m in notes(app) if "[train]" in m)
        assert "seeds is for `tistudio train` only" in warning and "compile = 'sometimes'" in warning


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
        await wait_for(pilot, lambda: any("no concept named" in m for m in notes(app)), 10, "the error")
        assert app.is_running


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


async def test_a_running_run_is_read_once_while_the_engine_is_away(tmp_path, monkeypatch):
    """A run whose record says it is running, shown on Train while the engine is not connected:
    the studio reads its log, then waits for news (it used to read it again and redraw at every
    flush, four times a second, for as long as the engine stayed away)."""
    import json

    from engine.store.events import EventLog
    from tistudio.messages import EngineSnapshot

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "events.jsonl", "w") as fh:
        for seq, event in enumerate([{"type": "status", "status": "running"},
                                     {"type": "step", "step": 10, "steps": 100, "loss": 0.2}], start=1):
            fh.write(json.dumps({"seq": seq, "t": 1.0 + seq, **event}) + "\n")
    job = {"id": "20260101-000000-ab12", "kind": "train", "concept": "sample", "status": "running", "step": 10,
           "steps": 100, "run_dir": str(run_dir), "params": {"steps": 100}}
    reads = []
    real_read = EventLog.read
    monkeypatch.setattr(EventLog, "read", lambda self, *a, **k: reads.append(1) or real_read(self, *a, **k))
    app = offline_app(tmp_path / "home")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        app.post_message(EngineSnapshot({}, [job]))
        await wait_for(pilot, lambda: app.state.tracks.get(job["id"]) and app.state.tracks[job["id"]].last_seq == 2,
                       5, "the run's log read")
        before = len(reads)
        await pilot.pause(1.5)
        assert len(reads) - before <= 1, f"the log was read {len(reads) - before} more times in 1.5 s"
