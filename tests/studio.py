"""What the studio's tests share: the App offline or against the real engine, waiting on the
Pilot, the New-run form.  The engine-backed tests share one engine for the session (conftest's
`studio_home`, and `trained_run`: a finished run of the sample concept)."""

from __future__ import annotations

import time
from pathlib import Path

from textual.widgets import Input

from tistudio.app import StudioApp

ROOT = Path(__file__).resolve().parent.parent
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


def engine_app(home, **kwargs) -> StudioApp:
    return StudioApp(home, "builtin:tiny", image_protocol="halfblock", theme="tistudio-dark", clip="builtin:tiny",
                     eval_images=2, eval_params={"sample_steps": 2}, poll_seconds=0.5, **kwargs)


async def online(app, pilot):
    await wait_for(pilot, lambda: app.state.engine == "online", 40, "the engine to come online")


def notes(app) -> list[str]:
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
