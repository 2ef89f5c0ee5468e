"""The studio stays responsive (event-loop lag under 100 ms) while a run streams events to it."""

from __future__ import annotations

import asyncio
import time

import pytest

from helpers import TEST_HANDLERS
from tistudio.app import StudioApp

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")]


async def test_event_loop_lag_stays_under_100ms_while_a_run_streams(engine_home, monkeypatch):
    monkeypatch.setenv("TISTUDIO_EXTRA_HANDLERS", TEST_HANDLERS)
    app = StudioApp(engine_home, "builtin:tiny", image_protocol="halfblock", theme="tistudio-dark",
                    add_sample=False, poll_seconds=0.5)
    async with app.run_test(size=(100, 30)) as pilot:
        deadline = time.monotonic() + 40
        while app.state.engine != "online" and time.monotonic() < deadline:
            await pilot.pause(0.2)
        assert app.state.engine == "online"
        await pilot.press("2")
        idle = await _lags(2.0)  # the same loop with no run streaming: what this machine gives right now
        from engine.wire.client import EngineClient

        async with EngineClient(engine_home) as client:
            run_id = await client.submit("sleep", params={"seconds": 6, "steps": 1500})
        app.bridge.follow(run_id)
        lags = []
        while True:  # measure the loop's wake-up lateness until the run is over
            t0 = time.monotonic()
            await asyncio.sleep(0.02)
            lags.append(time.monotonic() - t0 - 0.02)
            track = app.state.tracks.get(run_id)
            if track is not None and track.status == "done":
                break
            assert time.monotonic() < deadline + 60, "the run never finished in the studio"
        track = app.state.tracks[run_id]
        assert len(track.xs) == 1500  # every streamed step reached the studio
        lags.sort()
        p99, worst = lags[int(0.99 * len(lags))], lags[-1]
        print(f"event-loop lag over {len(lags)} samples: p50 {lags[len(lags) // 2] * 1000:.0f} ms, "
              f"p99 {p99 * 1000:.0f} ms, worst {worst * 1000:.0f} ms")
        # p99, not the single worst sample: one scheduling hiccup of a shared 2-core CI box is not the studio;
        # and over the idle loop's own p99, so a machine busy with other work does not count against it
        idle_p99 = idle[int(0.99 * len(idle))]
        assert p99 < idle_p99 + 0.1, (f"p99 event-loop lag {p99 * 1000:.0f} ms (worst {worst * 1000:.0f} ms) "
                                      f"against {idle_p99 * 1000:.0f} ms idle")


async def _lags(seconds: float) -> list[float]:
    """How late the event loop wakes from 20 ms sleeps over `seconds`, sorted."""
    lags, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        await asyncio.sleep(0.02)
        lags.append(time.monotonic() - t0 - 0.02)
    return sorted(lags)
