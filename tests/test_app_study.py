"""The whole study in the studio (4 Metrics): the run picker, two evaluations compared, every
experiment (steps, init words, seeds, regularisers, synthesis) with its table and grid.

The engine tests run the REAL engine on builtin:tiny (one engine for the module, under a
short /tmp home), with 2 images per set and 2 sampling steps: what they check is that the
studio asks for the right job and shows what the engine wrote, not the scores themselves.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Select

from helpers import kill_engines
from studio import engine_app, online, wait_for
from tistudio.screens.experiment_modal import ExperimentModal, experiment_params
from tistudio.screens.gallery import GalleryScreen
from tistudio.screens.metrics import MetricsScreen
from tistudio.widgets.study import CompareView, StudyView

pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")
SIZE = (100, 30)


def test_the_experiment_dialog_turns_its_fields_into_the_jobs_params():
    assert experiment_params("seeds", values="0, 1,1", steps="4") == {
        "kind": "seeds", "values": [0, 1], "steps": 4, "save_every": 4, "preview_every": 0}
    assert experiment_params("init", values="building, tower", steps="10", seed="3") == {
        "kind": "init", "values": ["building", "tower"], "steps": 10, "save_every": 10, "preview_every": 0,
        "seed": 3}
    reg = experiment_params("regularize", values="none,directional", steps="4", seed="0", reg_weight="0.5")
    assert reg["values"] == ["none", "directional"] and reg["reg_weight"] == 0.5
    weighted = experiment_params("regularize", values="none, init-l2:0.003", steps="4", seed="0")
    assert weighted["values"] == ["none", "init-l2:0.003"]
    assert "reg_weight" not in experiment_params("regularize", values="norm", steps="4", seed="0")
    assert experiment_params("synthesis", images="3") == {"kind": "synthesis", "images": 3}
    for kind, fields, problem in (("seeds", {"values": "", "steps": "4"}, "at least one"),
                                  ("seeds", {"values": "a", "steps": "4"}, "Seeds must be a whole number"),
                                  ("regularize", {"values": "l1", "steps": "4", "seed": "0"},
                                   "Methods: unknown regulariser 'l1'"),
                                  ("regularize", {"values": "none,norm:-2", "steps": "4", "seed": "0"},
                                   "must be a positive number"),
                                  ("init", {"values": "cat", "steps": "0", "seed": "0"}, "Steps must be at least 1"),
                                  ("synthesis", {"images": "0"}, "Images per prompt")):
        with pytest.raises(ValueError, match=problem):
            experiment_params(kind, **fields)


# ---------------------------------------------------------------------------
# Against the real engine


@pytest.fixture(scope="module")
def study_home():
    path = Path(tempfile.mkdtemp(prefix="tis-study-"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TISTUDIO_ENGINE_IDLE", "120")
        yield path
    kill_engines(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def study_run(study_home) -> str:
    """A finished 8-step run of the sample concept, saved at 4 and 8."""
    from engine.wire.client import call
    from tistudio.samples import SAMPLE_NAME, ensure_sample_concept

    ensure_sample_concept(study_home, model="builtin:tiny")
    params = {"steps": 8, "log_every": 2, "save_every": 4, "preview_every": 0, "seed": 1, "model": "builtin:tiny"}
    run_id = call("submit", "train", concept=SAMPLE_NAME, params=params, home=study_home)
    assert call("wait", run_id, home=study_home) == "done"
    return run_id


async def metrics_screen(app, pilot) -> MetricsScreen:
    await online(app, pilot)
    app.selected_concept = "sample"
    await pilot.press("4")
    return await wait_for(pilot, lambda: isinstance(app.screen, MetricsScreen) and app.screen, 5, "4 Metrics")


def no_failure(app, kind: str):
    failed = [j for j in app.state.jobs_of(kind, "sample") if j.get("status") == "failed"]
    if failed:
        raise AssertionError(f"{kind} failed: {failed[-1].get('error')}")


@pytest.mark.timeout(400)
async def test_pick_a_saved_step_evaluate_it_and_compare_it_with_the_final_word(study_home, study_run):
    app = engine_app(study_home)
    async with app.run_test(size=SIZE) as pilot:
        screen = await metrics_screen(app, pilot)
        picker = screen.query_one("#metrics-run", Select)
        table1 = screen.query_one("#table1", DataTable)
        pins = [value for _, value in picker._options]
        assert f"sample@{study_run}" in pins and f"sample@{study_run}:4" in pins
        for pin in (f"sample@{study_run}:4", f"sample@{study_run}"):
            picker.value = pin
            await pilot.pause()
            before = len(app.state.jobs_of("eval", "sample"))
            await pilot.press("e")
            await wait_for(pilot, lambda b=before: len(app.state.jobs_of("eval", "sample")) > b, 20, "the eval job")
            job = app.state.jobs_of("eval", "sample")[-1]
            assert job["params"]["run"] == study_run and job["params"].get("step") == (4 if ":" in pin else None)

            def shown(p=pin):
                no_failure(app, "eval")
                return table1.row_count == 3 and (("step 4" in table1.border_subtitle) == (":" in p)) \
                    and "eval" in table1.border_subtitle

            await wait_for(pilot, shown, 240, f"Table 1 of {pin}")
        prompts = screen.query_one("#per-prompt", DataTable)
        assert all("<sample>" in str(prompts.get_row_at(i)[0]) for i in range(prompts.row_count))
        await pilot.press("v")  # Compare: the two evaluations, the newest as B
        compare = screen.query_one(CompareView)
        await wait_for(pilot, lambda: compare.query_one("#compare", DataTable).row_count >= 6, 10, "the comparison")
        a, b = compare.picked()
        assert (a["step"], a["final"], b["final"]) == (4, False, True)
        rows = compare.query_one("#compare", DataTable)
        first = rows.get_row_at(0)
        assert first[0] == "SD+TI reconstruction"
        assert float(first[3]) == pytest.approx(float(first[2]) - float(first[1]), abs=2e-4)


@pytest.mark.timeout(600)
async def test_every_experiment_runs_from_the_metrics_screen_with_its_table_and_grid(study_home, study_run):
    app = engine_app(study_home)
    async with app.run_test(size=SIZE) as pilot:
        screen = await metrics_screen(app, pilot)
        study = screen.query_one(StudyView)
        table = study.query_one("#study-table", DataTable)
        grid = study.query_one("#study-grid")
        cases = (("s", {"values": "0, 1", "steps": "2"}, "seeds", ["seed 0", "seed 1"]),
                 ("i", {"values": "toy, robot", "steps": "2"}, "init", ["init toy", "init robot"]),
                 ("r", {"values": "none, directional", "steps": "2", "reg_weight": "0.5"}, "regularize",
                  ["SD", "none", "directional"]),  # the trade-off: a row per method (its mean over seeds)
                 ("y", {"images": "1"}, "synthesis", None))
        for key, fields, kind, labels in cases:
            if kind == "synthesis":  # the sweeps' runs are newer: pick the word to show in new scenes
                screen.query_one("#metrics-run", Select).value = f"sample@{study_run}:4"
                await pilot.pause()
            before = len(app.state.jobs_of("experiment", "sample"))
            await pilot.press(key)
            modal = await wait_for(pilot, lambda: isinstance(app.screen, ExperimentModal) and app.screen, 5,
                                   f"the {kind} dialog")
            for field, value in fields.items():
                modal.query_one(f"#{field}", Input).value = value
            await pilot.click("#ok")
            await wait_for(pilot, lambda b=before: len(app.state.jobs_of("experiment", "sample")) > b, 20,
                           f"the {kind} job")
            job = app.state.jobs_of("experiment", "sample")[-1]
            assert job["params"]["kind"] == kind and job["params"]["model"] == "builtin:tiny"

            def shown(k=kind, j=job["id"]):
                no_failure(app, "experiment")
                report = study.shown()
                return (app.state.job(j) or {}).get("status") == "done" and report is not None \
                    and report.kind == k and report.grid is not None and report

            report = await wait_for(pilot, shown, 300, f"the {kind} report on Study")
            assert screen.query_one("#metrics-views").active == "view-study"
            await wait_for(pilot, lambda r=report: table.row_count == len(r.rows), 5, "its table")
            if labels:
                assert [table.get_row_at(i)[0] for i in range(table.row_count)] == labels
                assert all(float(table.get_row_at(i)[1]) > -1 for i in range(table.row_count))
            else:  # synthesis: one row per prompt of the study's section 5, the word written in each
                assert table.row_count >= 2 and all("<sample>" in table.get_row_at(i)[0]
                                                    for i in range(table.row_count))
                assert (job["params"]["run"], job["params"]["step"], job["params"]["images"]) == (study_run, 4, 1)
                assert report.data["step"] == 4 and not report.data["final"]
            await wait_for(pilot, lambda r=report: grid.path == r.grid, 5, "its grid drawn")
        regularize = next(j for j in app.state.jobs_of("experiment", "sample")
                          if j["params"]["kind"] == "regularize")
        assert regularize["params"]["reg_weight"] == 0.5 and regularize["params"]["steps"] == 2
        # every image the synthesis made is in the gallery, with the record it was saved with
        synthesis = app.state.jobs_of("experiment", "sample")[-1]["result"]["id"]
        await pilot.press("5")
        gallery = await wait_for(pilot, lambda: isinstance(app.screen, GalleryScreen) and app.screen, 5, "5 Gallery")
        gallery.query_one("#gallery-kind", Select).value = "experiment"
        listed = gallery.query_one("#gallery-list", DataTable)

        def synthesis_rows():
            rows = [listed.get_row_at(i) for i in range(listed.row_count)]
            return [r for r in rows if r[4] == synthesis]

        rows = await wait_for(pilot, synthesis_rows, 10, "the synthesis images in the gallery")
        assert {r[0] for r in rows} >= {"grid.png", "ti-0000.png", "sd-0000.png"}
        listed.move_cursor(row=next(i for i in range(listed.row_count)
                                    if tuple(listed.get_row_at(i)[j] for j in (0, 4)) == ("ti-0000.png", synthesis)))
        meta = gallery.query_one("#gallery-meta")
        await wait_for(pilot, lambda: f"word <sample> = sample@{study_run} (step 4)" in str(meta.render()), 5,
                       "the image's record")


def test_the_inspector_panel_shows_every_vector_and_the_runs_compared():
    from tistudio.widgets.inspect import inspect_text

    vector = {"index": 0, "norm": 1.2, "norm_percentile": 99.5, "norm_vs_median": 3.1, "init_token": "toy",
              "cos_init": 0.41, "nearest": [{"token": "toy</w>", "cos": 0.41}, {"token": "robot</w>", "cos": 0.3}]}
    result = {"concept": "cat", "token": "<cat>", "run": "r2", "step": 8, "final": True, "family": "sdxl",
              "vectors": 2, "encoders": [
                  {"name": "text_encoder", "width": 768, "vocab": {"median": 0.39, "p05": 0.3, "p95": 0.5, "max": 0.9},
                   "vectors": [vector, {**vector, "index": 1, "norm_vs_median": 1.1, "init_token": None,
                                        "cos_init": None}]},
                  {"name": "text_encoder_2", "width": 1280, "vocab": {"median": 1.0, "p05": 0.8, "p95": 1.2,
                                                                     "max": 2.0}, "vectors": [vector]}],
              "runs": {"ids": ["r1", "r2"], "labels": ["seed 0, init toy, 2 vector(s)", None],
                       "cosine": [[1.0, 0.62], [0.62, None]]}}
    text = inspect_text(result)
    assert "cat@r2[/b] (final) · SDXL · 2 vectors · token <cat>" in text.replace("\\", "")
    assert "text_encoder[/b] (768 wide): vocabulary norm median 0.39, 5–95% 0.30–0.50, max 0.90" in text
    assert "[$warning]norm 1.20 = 3.1× median (99.5th percentile)[/] · cos to 'toy' 0.41" in text  # too strong
    assert " #1 norm 1.20 = 1.1× median" in text and text.count("cos to") == 2  # #1 started from a file
    assert "nearest:[/dim] toy</w> 0.41 · robot</w> 0.30" in text
    assert " 1 seed 0, init toy, 2 vec…  1.00  0.62" in text and " 2 r2" in text and "0.62     –" in text
    assert "Runs" not in inspect_text({**result, "runs": {"ids": ["r2"], "labels": [None], "cosine": [[1.0]]}})


@pytest.mark.timeout(300)
async def test_inspect_a_word_from_the_library(study_home, study_run):
    from tistudio.screens.library import LibraryScreen
    from tistudio.screens.modals import TextModal

    app = engine_app(study_home)
    async with app.run_test(size=SIZE) as pilot:
        await online(app, pilot)
        assert isinstance(app.screen, LibraryScreen)
        table = app.screen.query_one("#concepts", DataTable)
        table.move_cursor(row=[r.name for r in app.screen.rows].index("sample"))
        assert table.get_row_at(table.cursor_row)[4] == "1"  # its word's vectors
        await pilot.press("v")
        modal = await wait_for(pilot, lambda: isinstance(app.screen, TextModal) and app.screen, 5, "the dialog")
        modal.query_one("#value", Input).value = "sample@nope:3"
        await pilot.press("enter")
        assert "Write sample" in str(modal.query_one("#error").render())  # not a saved word: nothing submitted
        modal.query_one("#value", Input).value = f"sample@{study_run}:4"
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen), 5, "the dialog to close")
        job = await wait_for(pilot, lambda: app.state.jobs_of("inspect", "sample") and
                             app.state.jobs_of("inspect", "sample")[-1], 20, "the inspect job")
        assert job["params"] == {"run": study_run, "step": 4, "top": 10, "model": "builtin:tiny"}
        panel = app.screen.query_one("#inspect")

        def shown():
            record = app.state.job(job["id"]) or {}
            if record.get("status") == "failed":
                raise AssertionError(record.get("error"))
            return "nearest:" in str(panel.render())

        await wait_for(pilot, shown, 120, "the inspection in the panel")
        text = str(panel.render())
        assert f"sample@{study_run} (step 4) · SD 1.x · 1 vector" in text and "vocabulary norm median" in text
        assert "cos to 'toy" in text
        from engine.store.library import Library
        from engine.store.words import done_runs

        several = len(done_runs(Library(study_home).get("sample"))) > 1  # the sweeps of the tests above make more
        assert ("Runs: cosine between their words" in text) == several
