"""The Python versions and dependency ranges pyproject.toml declares are the ones the code needs.

Finding: `requires-python >=3.10` while `tomllib` (3.11+) was imported unconditionally, so
every library command failed on Ubuntu 22.04's Python; and `torch>=2.1` while the code uses
torch.OutOfMemoryError and torch.serialization.safe_globals (2.5+).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted([*REPO.glob("engine/**/*.py"), *REPO.glob("tistudio/**/*.py")])
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _guarded(tree: ast.Module, node: ast.AST) -> bool:
    """True if `node` sits in an `if sys.version_info >= (3, 11):` block."""
    for parent in ast.walk(tree):
        if isinstance(parent, ast.If) and "version_info" in ast.unparse(parent.test):
            if any(node is child for stmt in parent.body for child in ast.walk(stmt)):
                return True
    return False


def test_tomllib_is_only_imported_behind_a_version_check():
    bare = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            imports_it = isinstance(node, ast.Import) and any(a.name == "tomllib" for a in node.names)
            if imports_it and not _guarded(tree, node):
                bare.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bare, f"tomllib imported without the 3.10 fallback (tomli): {bare}"
    deps = PYPROJECT["project"]["dependencies"]
    assert any(d.startswith("tomli>=") and "python_version < '3.11'" in d for d in deps)


def test_declared_python_and_torch_floor():
    assert PYPROJECT["project"]["requires-python"] == ">=3.10"
    torch_dep = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch>="))
    floor = tuple(int(x) for x in torch_dep.split(">=")[1].split(".")[:2])
    assert floor >= (2, 5), "the code uses torch.OutOfMemoryError and torch.serialization.safe_globals"
    uses = "".join(p.read_text() for p in SOURCES)
    assert "OutOfMemoryError" in uses or "safe_globals" in uses  # the reason for the floor is still there


def _python310() -> str | None:
    """A working Python 3.10 (a pyenv shim on the PATH may name one that is not installed)."""
    candidates = [*map(str, sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))),
                  shutil.which("python3.10")]
    for candidate in filter(None, candidates):
        try:
            probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 10)":
            return candidate
    return None


@pytest.mark.skipif(_python310() is None, reason="no Python 3.10 interpreter on this machine")
def test_every_module_compiles_under_python_3_10():
    code = ("import sys, pathlib; bad = []\n"
            "for p in map(pathlib.Path, sys.argv[1:]):\n"
            "    try: compile(p.read_text(), str(p), 'exec')\n"
            "    except SyntaxError as e: bad.append(f'{p}:{e.lineno} {e.msg}')\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([_python310(), "-c", code, *map(str, SOURCES)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
