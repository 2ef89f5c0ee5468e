"""The layers' import contract, checked in fresh interpreters:

* `tistudio` (the studio and the CLI) never imports torch, diffusers, transformers or
  open_clip when its modules load: they happen inside the commands that need them;
* `engine` never imports textual;
* the engine process (the server and its units) imports no torch: GPU work is the worker's;
* Ray (the `cluster` extra) is imported only by an engine started with --ray: never by the
  studio, the CLI, or the engine's modules when they load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "torchvision", "diffusers", "transformers", "open_clip"]
ENGINE_PROCESS = ["engine.server", "engine.operations", "engine.scheduler", "engine.supervisor", "engine.job_queue",
                  "engine.fanout", "engine.ledger", "engine.protocol", "engine.client", "engine.device_probe",
                  "engine.devices", "engine.placement", "engine.sweeps", "engine.checkpoints", "engine.ray_backend"]

pytestmark = pytest.mark.timeout(300)


def _imported_after(modules: list[str] | str, watch: list[str]) -> dict:
    """Import `modules` (a package name: it and every module under it) in a fresh interpreter;
    return {"modules": what was imported, "loaded": {watched top-level package: first importer}}."""
    code = f"""
import importlib, json, pkgutil, sys
target = {modules!r}
if isinstance(target, str):
    package = importlib.import_module(target)
    names = [target] + [m.name for m in pkgutil.walk_packages(package.__path__, target + ".")
                        if not m.name.endswith("__main__")]
else:
    names = target
loaded = {{}}
for name in names:
    importlib.import_module(name)
    for watched in {watch!r}:
        if watched in sys.modules and watched not in loaded:
            loaded[watched] = name
print(json.dumps({{"modules": names, "loaded": loaded}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_tistudio_never_imports_torch_or_the_model_libraries_at_module_level():
    found = _imported_after("tistudio", [*HEAVY, "ray"])
    assert len(found["modules"]) > 10  # the walk really found the package's modules
    assert found["loaded"] == {}, f"imported at module level (package: first importer): {found['loaded']}"


def test_engine_never_imports_textual():
    found = _imported_after("engine", ["textual"])
    assert "engine.train" in found["modules"] and "engine.server" in found["modules"]
    assert found["loaded"] == {}, f"textual imported by {found['loaded']}"


def test_the_engine_process_imports_no_torch():
    found = _imported_after(ENGINE_PROCESS, [*HEAVY, "ray"])
    assert found["loaded"] == {}, f"imported by the engine process (package: first importer): {found['loaded']}"


def test_the_engine_package_loads_no_ray():
    found = _imported_after("engine", ["ray"])
    assert "engine.ray_backend" in found["modules"]
    assert found["loaded"] == {}, f"ray imported by {found['loaded']}"


def test_the_plain_cli_never_imports_ray(tmp_path):
    """`engine status`, `engine start` and `runs`, with an engine running on this machine."""
    code = """
import os, sys
from tistudio.cli import main
for argv in (["engine", "status"], ["engine", "start"], ["runs"], ["engine", "status", "--json"], ["engine", "stop"]):
    assert main(argv) == 0, argv
print("RAY" if "ray" in sys.modules else "NO-RAY")
"""
    import os

    home = Path(tempfile.mkdtemp(prefix="tis-"))  # a short home: the engine's socket path must fit
    env = {**os.environ, "TISTUDIO_HOME": str(home), "TISTUDIO_CONFIG_DIR": str(tmp_path / "config"),
           "TISTUDIO_RAY_ADDRESS": "off", "TISTUDIO_DEVICES": "cpu", "TISTUDIO_ENGINE_IDLE": "30"}
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=240)
    finally:
        from helpers import kill_engines

        kill_engines(home)
        shutil.rmtree(home, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "NO-RAY"
