"""What device a worker would run on, and the environment that decides it, found without torch.

The engine server never imports torch (it would hold a CUDA context and cost seconds),
and `tistudio engine status` must not start a worker just to ask.  So this works out
what the worker would pick (`engine.devices.runtime.pick_device`: $TISTUDIO_DEVICE, else CUDA when
torch has it and a GPU is visible, else the CPU) from what can be read cheaply:

* the environment ($TISTUDIO_DEVICE, $CUDA_VISIBLE_DEVICES);
* whether the installed torch is a CUDA (or ROCm) build: its library folder, not an import;
* the GPUs `nvidia-smi` lists (name, memory in use and in all), in CUDA's order, else the
  driver's /proc entries (names only).

A worker that is idle and has loaded torch answers with torch's own figures instead
(engine.server.supervisor asks it first).  The result has "source" saying where it came from.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

# Variables besides TISTUDIO_* that change what a worker does.
ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
               "PYTORCH_CUDA_ALLOC_CONF")
NVIDIA_SMI_TIMEOUT = 5.0
MIB = 2**20


def environment(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables set in `env` that matter to a worker: ENVIRONMENT and every TISTUDIO_*
    (but the engine's own bookkeeping)."""
    return {k: env[k] for k in sorted(env)
            if (k in ENVIRONMENT or k.startswith("TISTUDIO_")) and k != "TISTUDIO_ENGINE_PID"}


@dataclass
class Gpu:
    index: int  # as nvidia-smi numbers it (not CUDA's, once CUDA_VISIBLE_DEVICES reorders)
    uuid: str
    name: str
    total: int | None = None  # bytes
    used: int | None = None
    source: str = "nvidia-smi"


def probe(env: Mapping[str, str] = os.environ, gpus: list[Gpu] | None = None) -> dict:
    """{"device": "cuda:N" | "cpu" | …, "source", and for a GPU "name", "vram_total",
    "vram_used_device" (bytes, when nvidia-smi gives them); "note" when something is off}.
    `gpus`: every GPU of the machine (`all_gpus()`), when the caller has asked already."""
    requested = env.get("TISTUDIO_DEVICE") or None
    if requested and not requested.startswith("cuda"):
        return {"device": requested, "source": "TISTUDIO_DEVICE"}
    everything = all_gpus() if gpus is None else gpus
    gpus = visible(everything, env.get("CUDA_VISIBLE_DEVICES"))
    cuda_build = torch_has_cuda()
    if gpus and cuda_build:
        index = int(requested.partition(":")[2] or 0) if requested else 0
        if index >= len(gpus):
            return {"device": requested, "source": "TISTUDIO_DEVICE",
                    "note": f"only {len(gpus)} GPU(s) are visible; the worker will refuse {requested}"}
        return _describe(index, gpus[index], len(gpus))
    info = {"device": "cpu", "source": "probe"}
    if requested:
        info["note"] = f"TISTUDIO_DEVICE={requested} but CUDA is not available; the worker will refuse it"
    elif gpus:
        info["note"] = (f"{len(gpus)} NVIDIA GPU(s) visible, but the installed torch has no CUDA: "
                        "install a CUDA build of torch (see the README)")
    elif env.get("CUDA_VISIBLE_DEVICES") is not None and everything:
        info["note"] = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} hides every GPU"
    return info


def _describe(index: int, gpu: Gpu, count: int) -> dict:
    info = {"device": f"cuda:{index}", "name": gpu.name, "source": gpu.source}
    if gpu.total is not None:
        info["vram_total"] = gpu.total
    if gpu.used is not None:
        info["vram_used_device"] = gpu.used
    if count > 1:
        info["gpus"] = count
    return info


def torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA or ROCm build, read from its files (no import):
    torch/version.py names the CUDA (or HIP) version it was built for, or None."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    folder = Path(spec.origin).parent
    try:
        text = (folder / "version.py").read_text()
    except OSError:
        return any((folder / "lib").glob("libtorch_cuda*")) or any((folder / "lib").glob("libtorch_hip*"))
    return bool(_BUILT_FOR.search(text))


# `cuda: Optional[str] = '12.8'` (or `hip = '6.2'`) in torch/version.py; None on a CPU build.
_BUILT_FOR = re.compile(r"""^(?:cuda|hip)\b[^=\n]*=\s*['"]\d""", re.MULTILINE)


def all_gpus() -> list[Gpu]:
    """Every NVIDIA GPU on the machine, in nvidia-smi's order; [] when there are none."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=index,uuid,name,memory.total,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT, check=True).stdout
            return [_parse_smi(line) for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError, ValueError):
            pass  # a broken driver: fall back to what the driver's /proc entries say
    return _driver_gpus()


def _parse_smi(line: str) -> Gpu:
    index, uuid, name, total, used = (part.strip() for part in line.split(","))
    return Gpu(int(index), uuid, name, _mib(total), _mib(used))


def _mib(text: str) -> int | None:
    try:
        return int(float(text) * MIB)
    except ValueError:
        return None  # "[N/A]" on some boards


def _driver_gpus() -> list[Gpu]:
    gpus = []
    for k, info in enumerate(sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))):
        try:
            fields = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        gpus.append(Gpu(k, fields.get("GPU UUID", "").strip(), fields.get("Model", "NVIDIA GPU").strip(),
                        source="driver"))
    return gpus


def visible(gpus: list[Gpu], cuda_visible_devices: str | None) -> list[Gpu]:
    """The GPUs CUDA shows a process, in CUDA's order (cuda:0 first).  Like CUDA, an entry
    that names no GPU ends the list; "" or "-1" hides them all."""
    if cuda_visible_devices is None:
        return list(gpus)
    shown = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        match = next((g for g in gpus if _names(entry, g)), None)
        if match is None or match in shown:
            break
        shown.append(match)
    return shown


def _names(entry: str, gpu: Gpu) -> bool:
    if entry.isdigit():
        return int(entry) == gpu.index
    return bool(entry) and bool(gpu.uuid) and gpu.uuid.startswith(entry)
