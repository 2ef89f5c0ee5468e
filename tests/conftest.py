"""Shared fixtures: an isolated data home per test, tiny model, sample images."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


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
    from engine.models import load_model

    return load_model("builtin:tiny")


@pytest.fixture(scope="session")
def sdxl_model():
    """builtin:sdxl-tiny: SDXL-shaped (two text encoders, 32 and 64 wide), random weights."""
    from engine.models import load_model

    return load_model("builtin:sdxl-tiny")


@pytest.fixture
def image_dir(tmp_path):
    from helpers import make_images

    return make_images(tmp_path / "images", count=3)


@contextlib.contextmanager
def _engine_dir():
    """A short home under /tmp (Unix socket paths are limited to ~108 bytes) whose engine
    processes are all killed, and the folder removed, when its user is done, whatever happened."""
    import shutil
    import tempfile

    from helpers import kill_engines

    path = Path(tempfile.mkdtemp(prefix="tis-"))
    try:
        yield path
    finally:
        kill_engines(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def engine_home(monkeypatch):
    """A home, and so an engine, of the test's own."""
    with _engine_dir() as path:
        monkeypatch.setenv("TISTUDIO_HOME", str(path))
        monkeypatch.setenv("TISTUDIO_ENGINE_IDLE", "60")
        yield path


@pytest.fixture(scope="module")
def _module_home():
    with _engine_dir() as path:
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
