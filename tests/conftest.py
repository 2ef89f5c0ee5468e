"""Shared fixtures: an isolated data home per test, tiny model, sample images."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The suite's torch runs on one thread (before anything loads torch's OpenMP, which reads this
# once): `make test` runs a pytest-xdist worker per core, and the demo measurement
# (tests/demo_measurement.py) takes what they leave.  A two-thread OpenMP region whose second
# thread shares a core with another busy process spins waiting for it: tests ran up to 14 times
# slower that way.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every engine a test starts (through a client, a CLI, the studio) stops when this pytest is gone,
# killed or not: its jobs end interrupted and its workers go with it (engine.server.main).
os.environ["TISTUDIO_ENGINE_OWNER"] = str(os.getpid())


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Never touch the user's real library or config from a test."""
    monkeypatch.setenv("TISTUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TISTUDIO_CONFIG_DIR", str(tmp_path / "config"))
    # Tests name their model: builtin:tiny (random weights, seconds) unless a test says otherwise.
    # The product's default (builtin:demo) has its own test in tests/test_cli.py.
    monkeypatch.setenv("TISTUDIO_MODEL", "builtin:tiny")
    yield


@pytest.fixture(scope="session")
def tiny_model():
    from engine.sd.models import load_model

    return load_model("builtin:tiny")


@pytest.fixture(scope="session")
def sdxl_model():
    """builtin:sdxl-tiny: SDXL-shaped (two text encoders, 32 and 64 wide), random weights."""
    from engine.sd.models import load_model

    return load_model("builtin:sdxl-tiny")


@pytest.fixture
def image_dir(tmp_path):
    from helpers import make_images

    return make_images(tmp_path / "images", count=3)


@pytest.fixture
def engine_home(monkeypatch):
    """A home, and so an engine, of the test's own."""
    from helpers import scratch_engine_home

    with scratch_engine_home() as path:
        monkeypatch.setenv("TISTUDIO_HOME", str(path))
        monkeypatch.setenv("TISTUDIO_ENGINE_IDLE", "60")
        yield path


@pytest.fixture(scope="module")
def _module_home():
    from helpers import scratch_engine_home

    with scratch_engine_home() as path:
        yield path


@pytest.fixture
def shared_engine_home(_module_home, monkeypatch):
    """As engine_home, but one home, and so one engine with its warm worker, for all the tests
    of a module that ask for it; for tests that run in the same environment (the engine keeps
    the one it started in) and need no fresh engine.  Its processes are killed when the module
    ends."""
    monkeypatch.setenv("TISTUDIO_HOME", str(_module_home))
    monkeypatch.setenv("TISTUDIO_ENGINE_IDLE", "60")
    return _module_home


# -- the studio's tests against the real engine share one (tests/studio.py)


@pytest.fixture(scope="session")
def studio_home():
    import shutil
    import tempfile

    from helpers import kill_engines

    path = Path(tempfile.mkdtemp(prefix="tis-app-"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TISTUDIO_ENGINE_IDLE", "120")
        yield path
    kill_engines(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_run(studio_home) -> str:
    """A finished run of the sample concept (16 steps on builtin:tiny, saved at 8 and 16),
    trained once for the tests that need one, whichever of them runs first or alone."""
    from engine.wire.client import call
    from tistudio.samples import SAMPLE_NAME, ensure_sample_concept

    ensure_sample_concept(studio_home, model="builtin:tiny")
    params = {"steps": 16, "log_every": 2, "save_every": 8, "preview_every": 0, "seed": 3, "model": "builtin:tiny"}
    run_id = call("submit", "train", concept=SAMPLE_NAME, params=params, home=studio_home)
    status = call("wait", run_id, home=studio_home)
    assert status == "done", f"the fixture's training run {run_id} ended {status}"
    return run_id


# -- the demo's measurement runs beside the rest (tests/demo_measurement.py) ------------------------


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """The demo measurement's test goes last: by then its process has long finished."""
    import demo_measurement

    items.sort(key=lambda item: item.nodeid == demo_measurement.TEST_ID)  # stable: the rest keep their order


def pytest_configure(config):
    """Under pytest-xdist the controller runs no test and collects nothing: for a whole-suite run
    it starts the measurement itself, before its workers start, and they share it.  The session's
    one zygote (tests/shared_zygote.py) is started here too, by the controller or a plain run."""
    import demo_measurement
    import shared_zygote

    from engine.sd import demo_model

    option = config.option
    if not hasattr(config, "workerinput") and not option.collectonly:
        shared_zygote.start()
    controller = bool(getattr(option, "numprocesses", None)) and not hasattr(config, "workerinput")
    whole_suite = set(config.args) <= {"tests", str(Path(__file__).parent)} and not (
        option.keyword or option.markexpr or getattr(option, "deselect", None) or option.collectonly)
    if controller and whole_suite and demo_model.weights_present():
        demo_measurement.start()


def pytest_collection_finish(session):
    import demo_measurement

    from engine.sd import demo_model

    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller started it, or the test will
        return
    selected = any(item.nodeid == demo_measurement.TEST_ID for item in session.items)
    if selected and len(session.items) > 1 and demo_model.weights_present() and not session.config.option.collectonly:
        demo_measurement.start()


def pytest_sessionfinish(session):
    import demo_measurement

    demo_measurement.stop()


def pytest_unconfigure(config):
    import shared_zygote

    shared_zygote.stop()
