"""1 Library in the studio: the sample concept, rename and delete, a concept's images, the import
and export dialogs; against the real engine: a concept made in the form, export then import."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Button, DataTable, Input, Static

from helpers import make_images
from studio import SIZE, engine_app, notes, offline_app, online, wait_for
from tistudio.screens.library import LibraryScreen
from tistudio.screens.modals import ConfirmModal, NewConceptModal, TextModal

pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")


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
        assert any("Images of imp: 2 added" in m for m in notes(app))
        assert any("Images of imp: 1 removed" in m for m in notes(app))


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
        assert "Concept bot created." in notes(app)


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
        await wait_for(pilot, lambda: out.is_file() and any("Exported" in m for m in notes(app)), 90, "the export")
        async def import_it(**fields) -> None:
            await pilot.press("i")
            await wait_for(pilot, lambda: isinstance(app.screen, ImportModal), 5, "the import dialog")
            for key, value in fields.items():
                app.screen.query_one(f"#{key}", Input).value = value
            await pilot.click("#ok")

        # the file's own token is taken by the concept it came from: the CLI's error is a notification
        await import_it(file=str(out), name="robot-copy")
        await wait_for(pilot, lambda: any("already used" in m for m in notes(app)), 90, "the error")
        await import_it(file=str(out), name="robot-copy", token="<robot-copy>")
        await wait_for(pilot, lambda: any("imported" in m for m in notes(app)), 90, "the import")
        await wait_for(pilot, lambda: "robot-copy" in [r.name for r in app.screen.rows], 5, "the new row")
    assert Library(studio_home).get("robot-copy").token == "<robot-copy>"
