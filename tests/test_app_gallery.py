"""5 Gallery: every image the engine made, filtered by concept, run and kind, each drawn inline
with the record it was saved with.  No engine: the data home of the snapshot tests (one
generation with sidecars, an evaluation image, an experiment grid)."""

from __future__ import annotations

import pytest
from test_app_snapshots import RUN, app_for, make_demo_home
from textual.widgets import DataTable, Select, Static

from studio import wait_for
from tistudio.screens.gallery import ALL, GalleryScreen

pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")


async def test_key_5_opens_the_gallery_and_its_filters_narrow_the_list(tmp_path):
    home = make_demo_home(tmp_path / "home")
    app = app_for(home)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("5")
        screen = await wait_for(pilot, lambda: isinstance(app.screen, GalleryScreen) and app.screen, 5, "5 Gallery")
        table = screen.query_one("#gallery-list", DataTable)
        await wait_for(pilot, lambda: table.row_count == 6, 10, "every image listed")
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        assert [(r[0], r[1]) for r in rows] == [("ti-001.png", "generate"), ("ti-000.png", "generate"),
                                                ("sd-001.png", "generate"), ("sd-000.png", "generate"),
                                                ("ti-0000.png", "eval"), ("grid.png", "experiment")]
        meta = lambda: str(screen.query_one("#gallery-meta", Static).render())  # noqa: E731
        assert "a photo of <sample>" in meta() and f"word <sample> = sample@{RUN} (final)" in meta()
        assert "sampler DPM++ 2M" in meta() and "model builtin:tiny (SD 1.x)" in meta()
        await pilot.press("down", "down")  # the SD side of the comparison: its own record
        await wait_for(pilot, lambda: "a photo of a small toy robot" in meta(), 5, "the SD image's record")
        assert "word" not in meta()
        kind = screen.query_one("#gallery-kind", Select)
        kind.value = "eval"
        await wait_for(pilot, lambda: table.row_count == 1, 5, "the eval images alone")
        assert "eval 20260101-020000" in str(screen.query_one("#gallery-image").query_one(".caption").render())
        kind.value = ALL
        run = screen.query_one("#gallery-run", Select)
        assert [v for _, v in run._options] == [ALL, RUN]
        run.value = RUN
        await wait_for(pilot, lambda: table.row_count == 5, 5, "the run's images (not the grid of another)")
        screen.query_one("#gallery-concept", Select).value = "sample"
        await pilot.pause()
        assert table.row_count == 5
        kind.value = "experiment"
        await wait_for(pilot, lambda: table.row_count == 0, 5, "nothing")
        assert "No image matches the filters." in meta()
