"""Installed as a user installs it: a wheel in a fresh venv, run from outside the repository.

The venv reuses this environment's dependencies (a .pth line to its site-packages, whose
own .pth files — the editable install among them — are not processed), so only the wheel
decides what tistudio is: if the wheel lacks a theme, a demo weight or a sample, it shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with only the built wheel of tistudio installed; returns its bin/ folder."""
    root = tmp_path_factory.mktemp("wheel")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(REPO)], check=True, cwd=root, capture_output=True)
    wheel = next(wheels.glob("tistudio-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    str(wheel)], check=True, capture_output=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TISTUDIO_MODEL")}
    env.update(TISTUDIO_HOME=str(home), TISTUDIO_ENGINE_IDLE="30", OMP_NUM_THREADS="1")
    return env


def test_the_wheel_carries_the_product(installed, tmp_path):
    code = ("import tistudio, engine, tistudio.themes as t, tistudio.samples as s, engine.sd.demo_model as d;"
            "print(tistudio.__file__); print(t.shipped_dir()); print(s.DEMO_SAMPLES); print(d.WEIGHTS)")
    out = subprocess.run([str(installed / "python"), "-c", code], cwd=tmp_path, env=_env(tmp_path / "h"),
                         check=True, capture_output=True, text=True).stdout.split("\n")
    package, themes, samples, weights = map(Path, out[:4])
    assert REPO not in package.parents, f"tistudio was imported from the checkout: {package}"
    assert sorted(p.name for p in themes.glob("*.toml")) == sorted(p.name for p in (REPO / "themes").glob("*.toml"))
    assert (samples / "concepts.json").is_file() and REPO not in samples.parents
    assert sorted(p.name for p in weights.glob("*.safetensors")) == ["clip.safetensors", "unet.safetensors",
                                                                      "vae.safetensors"]


def test_generate_on_the_demo_model_from_outside_the_repo(installed, tmp_path):
    home = tmp_path / "home"
    try:
        proc = subprocess.run([str(installed / "tistudio"), "--model", "builtin:demo", "generate", "a toy", "-n", "1",
                               "--json"], cwd=tmp_path, env=_env(home), capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run([str(installed / "tistudio"), "engine", "stop", "--force"], cwd=tmp_path, env=_env(home),
                       capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    import json

    images = json.loads(proc.stdout)
    assert len(images) == 1 and Path(images[0]["path"]).is_file()
    assert home in Path(images[0]["path"]).parents


def test_the_studio_opens_headless_with_the_project_theme(installed, tmp_path):
    script = """
import asyncio
from tistudio.app import StudioApp

async def main():
    app = StudioApp(poll_seconds=3600)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        print(app.theme)
        print(sorted(t for t in app.available_themes if t.startswith("tistudio")))

asyncio.run(main())
"""
    home = tmp_path / "h"
    try:
        proc = subprocess.run([str(installed / "python"), "-c", script], cwd=tmp_path, env=_env(home),
                              capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run([str(installed / "tistudio"), "engine", "stop", "--force"], cwd=tmp_path, env=_env(home),
                       capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    theme, available = proc.stdout.strip().split("\n")[-2:]
    assert theme == "tistudio-dark"
    import tomllib

    shipped = sorted(tomllib.loads(p.read_text())["name"] for p in (REPO / "themes").glob("*.toml"))
    assert available == str(shipped)
