"""4 Metrics in the studio, against the real engine: Table 1 and the steps experiment's curve."""

from __future__ import annotations

import pytest
from textual.widgets import DataTable

from studio import SIZE, engine_app, online, wait_for
from tistudio.screens.metrics import MetricsScreen

pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")


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
