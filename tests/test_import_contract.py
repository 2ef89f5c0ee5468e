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
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "torchvision", "diffusers", "transformers", "open_clip"]
# The engine's torch-free packages: the engine process (server) and everything it reads.
TORCH_FREE = ["engine.store", "engine.settings", "engine.wire", "engine.server"]
TORCH_FREE_MODULES = ["engine.errors", "engine.faults", "engine.devices.pool", "engine.devices.probe"]
# Which of engine's layers each layer may import (docs/architecture.md, "Where each thing lives").
# "root" is engine.errors and engine.faults.
MAY_IMPORT = {
    "root": set(),
    "devices": {"root"},
    "store": {"root"},
    "settings": {"root"},
    "wire": {"root", "store", "devices"},
    "sd": {"root", "settings", "store", "devices"},
    "inversion": {"root", "settings", "store", "sd", "devices"},
    "server": {"root", "devices", "store", "settings", "wire"},
    "worker": {"root", "devices", "store", "settings", "wire", "sd", "inversion"},
}
# Code of the server package that runs in another process: the zygote (it forks workers) and
# the Ray actor (it hosts one); they import the worker inside functions, never at module level.
HOSTS_A_WORKER = {"engine.server.zygote", "engine.server.ray_workers"}

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
    assert "engine.inversion.train" in found["modules"] and "engine.server.main" in found["modules"]
    assert found["loaded"] == {}, f"textual imported by {found['loaded']}"


@pytest.mark.parametrize("package", TORCH_FREE)
def test_the_torch_free_packages_import_no_torch(package):
    """Every module of the engine process's packages (and what they import) loads without torch."""
    found = _imported_after(package, [*HEAVY, "ray"])
    assert len(found["modules"]) > 2
    assert found["loaded"] == {}, f"imported by {package} (package: first importer): {found['loaded']}"


def test_the_shared_root_modules_import_no_torch():
    found = _imported_after(TORCH_FREE_MODULES, [*HEAVY, "ray"])
    assert found["loaded"] == {}, f"imported (package: first importer): {found['loaded']}"


def _layer(module: str) -> str:
    parts = module.split(".")
    return "root" if parts[1] in ("errors", "faults") else parts[1]


def _engine_imports(path: Path):
    """(imported engine module or name, at module level?) for every import in the file, functions included."""
    import ast

    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "engine":
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "engine"]
        for name in names:
            yield name, id(node) in top


def test_the_folder_tree_is_the_layering():
    """Each subpackage imports only the layers below it (at module level or inside functions):
    the folder tree is the process picture of docs/architecture.md."""
    bad, seen = [], set()
    for path in sorted((REPO / "engine").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if module == "engine":
            continue
        source = _layer(module)
        seen.add(source)
        for name, at_top in _engine_imports(path):
            target = _layer(name) if name.count(".") >= 1 else "engine"
            if target in (source, "engine"):
                continue
            if module in HOSTS_A_WORKER and target == "worker" and not at_top:
                continue
            if target not in MAY_IMPORT[source]:
                bad.append(f"{module} imports {name} ({source} -> {target})")
    assert seen == set(MAY_IMPORT), seen ^ set(MAY_IMPORT)
    assert not bad, "\n".join(bad)


def test_the_engine_package_loads_no_ray():
    found = _imported_after("engine", ["ray"])
    assert "engine.server.ray_workers" in found["modules"]
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

    from helpers import scratch_engine_home

    with scratch_engine_home() as home:  # a short home: the engine's socket path must fit
        env = {**os.environ, "TISTUDIO_HOME": str(home), "TISTUDIO_CONFIG_DIR": str(tmp_path / "config"),
               "TISTUDIO_RAY_ADDRESS": "off", "TISTUDIO_DEVICES": "cpu", "TISTUDIO_ENGINE_IDLE": "30"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "NO-RAY"


def test_the_studio_touches_the_library_only_through_its_service():
    """Screens, dialogs and widgets read and change the concept library through the App's one
    service (tistudio/library_service.py); none of them constructs engine.store.library.Library."""
    import ast

    found = []
    for path in sorted((REPO / "tistudio").rglob("*.py")):
        if path.name == "library_service.py" or "commands" in path.parts or path.name in ("cli.py", "samples.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Library":
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, f"Library constructed outside the studio's library service: {found}"


def test_no_class_is_a_room_too_big_to_read_alone():
    """No class of the engine or the studio runs past 300 lines: a newcomer reads one in a sitting
    (split a screen by view, a loop by concern)."""
    import ast

    big = []
    for path in sorted([*(REPO / "engine").rglob("*.py"), *(REPO / "tistudio").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                big.append(f"{path.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not big, big


def test_a_run_s_files_are_named_in_one_place_each():
    """run.json is engine.store.runs's (the Run type: its one reader, writer and lister) and events.jsonl
    engine.store.events's: no other module of the engine or the studio spells either name in code."""
    import ast

    owners = {"run.json": "engine/store/runs.py", "events.jsonl": "engine/store/events.py"}
    found = []
    for path in sorted([*(REPO / "engine").rglob("*.py"), *(REPO / "tistudio").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for name, owner in owners.items():
                    if name in node.value and path.relative_to(REPO).as_posix() != owner:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} spells {name}")
    assert not found, found
