"""The engine's door: every request is checked before anything is written, whichever client sent it.

These go over the socket as any client may (`EngineClient.submit`), not through the CLI, whose
own checks would catch them first: each is refused with one line naming the setting, and no run
directory is left in the library.
"""

from __future__ import annotations

import pytest

from engine.errors import UserError
from engine.settings.jobs import check_job
from engine.store.library import Library
from engine.wire.client import EngineClient
from helpers import make_images

pytestmark = pytest.mark.timeout(120)

GOOD = {"steps": 20, "save_every": 10, "preview_every": 0, "log_every": 10}
REFUSED = [
    ("train", {**GOOD, "steps": -5}, "--steps"),
    ("train", {**GOOD, "flip_p": 5}, "--flip"),
    ("train", {**GOOD, "lr": float("inf")}, "--lr"),
    ("train", {**GOOD, "vectors": 0}, "--vectors"),
    ("train", {**GOOD, "templates": ["a photo of a thing"]}, "{}"),
    ("train", {**GOOD, "bogus": 1}, "bogus"),
    ("train", {**GOOD, "device": "gpu7"}, "device"),
    ("sweep", {**GOOD, "seeds": [1, 2], "regularizes": ["init-l2:-1"]}, "strength"),
    ("generate", {"prompt": "a <toy>", "steps": 0}, "--steps"),
    ("generate", {"prompt": "a <toy>", "colour": "red"}, "colour"),
    ("eval", {"images": 0}, "--images"),
    ("experiment", {"kind": "nonsense"}, "experiment"),
    ("experiment", {"kind": "seeds", "values": [1, 2], "steps": 0}, "--steps"),
    ("inspect", {"top": 0}, "--top"),
    ("teleport", {}, "job kind"),
]


def _runs(home) -> list:
    return sorted(p.name for p in home.glob("concepts/*/runs/*")) + sorted(p.name for p in home.glob("jobs/*"))


@pytest.fixture(scope="module")
def door(_module_home):
    Library(_module_home).add("toy", make_images(_module_home / "pictures", count=2), init="toy")
    return _module_home


@pytest.mark.parametrize("kind,params,named", REFUSED, ids=[f"{k}-{n}" for k, _, n in REFUSED])
async def test_a_bad_request_over_the_socket_is_refused_and_writes_nothing(door, monkeypatch, kind, params, named):
    monkeypatch.setenv("TISTUDIO_HOME", str(door))
    monkeypatch.setenv("TISTUDIO_ENGINE_IDLE", "60")
    monkeypatch.setenv("TISTUDIO_DEVICES", "cpu")
    client = await EngineClient(door).connect()
    try:
        concept = None if kind in ("generate", "teleport") else "toy"
        with pytest.raises(UserError) as refused:
            await client.submit(kind, concept=concept, params=params)
    finally:
        await client.close()
    message = str(refused.value)
    assert named in message and "\n" not in message, message
    assert _runs(door) == []


def test_the_clients_check_with_the_same_code():
    """What the socket refuses, engine.settings.jobs refuses in the CLI's and the studio's process."""
    with pytest.raises(UserError, match="bogus"):
        check_job("train", {**GOOD, "bogus": 1})
    with pytest.raises(UserError, match="--flip"):
        check_job("train", {**GOOD, "flip_p": 5})
    check_job("train", GOOD)
    check_job("sweep", {**GOOD, "seeds": [1, 2], "regularizes": ["none", "init-l2:0.01"]})
    check_job("generate", {"prompt": "a <toy> at dusk", "n": 2, "sampler": "euler-a"})
    check_job("experiment", {"kind": "regularize", "values": ["none", "directional"], "steps": 10, "images": 2})


def test_a_resume_is_checked_with_its_merged_params():
    """A resume carries the record's params merged with new ones: the values are checked, and keys
    an older version wrote are let through (the worker ignores them)."""
    check_job("train", {**GOOD, "an_old_key": 1}, resumed=True)
    with pytest.raises(UserError, match="--lr"):
        check_job("train", {**GOOD, "lr": -1}, resumed=True)
