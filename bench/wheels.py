"""`make wheels`: the packages a bare GPU machine lacks, as wheels that travel with the tree.

The lent GPU machine (see README "Performance") runs its own Python 3.12 with torch and
transformers but no diffusers or open_clip, and reaches no package registry.  The
benchmark path (engine.sd.models, engine.inversion.train, engine.sd.generation, engine.inversion.metrics,
engine.store.library) needs exactly the packages in CARRIED beyond what its image holds
(DEVICE_PACKAGES); this downloads them (no dependencies: every requirement is decided
here, see `undecided_requirements`) into `.whl/`, which git ignores, and checks that the
tree plus the wheels fit the 64 MiB a device call may carry.

Standard library only (plus pip's vendored `packaging`): runs under any python3 with pip.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".whl"
TRAVEL_LIMIT_MIB = 64
DEVICE_PYTHON = "3.12"  # KINDS.md: python3 is Python 3.12.3 at /opt/torch/.venv/bin/python3
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# What the benchmark path imports that the device's image lacks, and why.
CARRIED = {
    "diffusers": "engine.sd.models builds every pipeline (UNet, VAE, schedulers) from it",
    "open-clip-torch": ("engine.inversion.metrics' CLIP (Table 1); engine.sd.tokenizer derives SD's vocabulary "
                        "from its BPE file"),
    "ftfy": "open_clip.tokenizer imports it",
    "wcwidth": "ftfy imports it",
    "platformdirs": "engine.store.paths and engine.sd.tokenizer (data and cache folders)",
    "tomli-w": "engine.store.library writes concept.toml (the Table-1 variant makes a concept)",
}
# Declared by a carried wheel, absent on the device, and not needed there.
NOT_CARRIED = {
    "importlib-metadata": "diffusers imports it only on Python < 3.8 (diffusers/utils/import_utils.py)",
}

# The device image's Python packages (.library/device/KINDS.md, read on a machine 2026-11-17).
DEVICE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tested_versions(root: Path = ROOT) -> dict[str, str]:
    """name -> version from constraints.txt: the exact versions CI and `make` install."""
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def pinned_versions() -> dict[str, str]:
    """name -> version for every carried package: the tested one, so what travels is what CI runs."""
    tested = tested_versions()
    missing = sorted(set(CARRIED) - set(tested))
    if missing:
        raise SystemExit(f"bench/wheels.py: constraints.txt pins no version of {', '.join(missing)}; pin it there")
    return {name: tested[name] for name in CARRIED}


def download(dest: Path, python: str = sys.executable) -> list[Path]:
    """Fetch the carried wheels for the device's Python and platform (one version each)."""
    dest.mkdir(exist_ok=True)
    wanted = pinned_versions()
    present = set()
    for wheel in dest.glob("*.whl"):  # an old version beside a new one would stop the install there
        name, version = wheel.name.split("-")[:2]
        if wanted.get(canonical(name)) != version:
            wheel.unlink()
        else:
            present.add(canonical(name))
    if present == set(wanted):  # all there already: no registry needed
        return sorted(dest.glob("*.whl"))
    platforms = [arg for p in DEVICE_PLATFORMS for arg in ("--platform", p)]
    cmd = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "--dest", str(dest),
           *(f"{n}=={v}" for n, v in wanted.items())]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit("make wheels: pip could not download the wheels above; it needs a package registry "
                         "(run it where `pip download` works, then carry .whl)")
    return sorted(dest.glob("*.whl"))


def wheel_metadata(wheel: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) read from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode("utf-8")
    fields = [line.split(": ", 1) for line in text.split("\n\n")[0].splitlines() if ": " in line]

    def get(key: str) -> list[str]:
        return [v for k, v in fields if k == key]

    return get("Name")[0], get("Version")[0], get("Requires-Dist")


def parse_requirement(text: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare python3: pip vendors packaging
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(text)


def device_requirements(wheel: Path) -> list:
    """The wheel's requirements that apply on the device (Python 3.12 on Linux x86-64, no extras)."""
    env = {"python_version": DEVICE_PYTHON, "python_full_version": DEVICE_PYTHON + ".3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    reqs = [parse_requirement(line) for line in wheel_metadata(wheel)[2]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def undecided_requirements(wheels: list[Path]) -> list[str]:
    """Requirements neither on the device, carried, nor known to be unneeded: each needs a decision."""
    decided = DEVICE_PACKAGES | set(CARRIED) | set(NOT_CARRIED)
    return sorted({f"{wheel_metadata(w)[0]} needs {r}" for w in wheels for r in device_requirements(w)
                   if canonical(r.name) not in decided})


def travel_sizes(root: Path = ROOT, carried: tuple[Path, ...] = (WHEEL_DIR,)) -> tuple[int, int]:
    """(bytes of the tree that travels, bytes of the carried paths): git's tracked and
    untracked-not-ignored files plus shared/, as the device tool counts them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = {root / name for name in listed if name}
    if (root / "shared").is_dir():
        files |= {p for p in (root / "shared").rglob("*")}
    tree = sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())
    extra = sum(p.stat().st_size for c in carried for p in ([c] if c.is_file() else c.rglob("*")) if p.is_file())
    return tree, extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=WHEEL_DIR)
    args = parser.parse_args(argv)
    wheels = download(args.dest)
    undecided = undecided_requirements(wheels)
    if undecided:
        print("make wheels: requirements with no decision (carry them, or say why not in bench/wheels.py):\n  "
              + "\n  ".join(undecided), file=sys.stderr)
        return 1
    for w in wheels:
        print(f"  {w.name} ({w.stat().st_size / 1024:,.0f} KiB)")
    tree, extra = travel_sizes(carried=(args.dest,))
    total = (tree + extra) / 2**20
    print(f"travels: tree {tree / 2**20:.1f} MiB + wheels {extra / 2**20:.1f} MiB = {total:.1f} MiB "
          f"(limit {TRAVEL_LIMIT_MIB} MiB)")
    if total > TRAVEL_LIMIT_MIB:
        print(f"make wheels: {total:.1f} MiB would travel, over the device's {TRAVEL_LIMIT_MIB} MiB; "
              "ignore or remove large untracked files", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
