"""What device a worker would run on, and the environment that decides it, found without torch.

The engine server never imports torch (it would hold a CUDA context and cost seconds),
and `tistudio engine status` must not start a worker just to ask.  So this works out
what the worker would pick (`engine.devices.runtime.pick_device`: $TISTUDIO_DEVICE, else CUDA when
torch has it and a GPU is visible, else the CPU) from what can be read cheaply:

* the environment ($TISTUDIO_DEVICE, $CUDA_VISIBLE_DEVICES);
* whether the installed torch is a CUDA (or ROCm) build: its library folder, not an import;
* the GPUs `nvidia-smi` lists (name, memory in use and in all), and the MIG devices it lists
  under them (`nvidia-smi -L`: `--query-gpu` leaves them out), else the driver's /proc
  entries (names only).

nvidia-smi numbers GPUs in PCI bus order; CUDA by default numbers them fastest first, so on a
box of mixed models `cuda:0` may be nvidia-smi's GPU 1.  The engine starts its workers with
CUDA_DEVICE_ORDER=PCI_BUS_ID (engine.devices.pool.worker_env) unless the user set an order, and
this module reads a missing order as that one: then CUDA's numbers are nvidia-smi's, and a name
or a memory figure belongs to the GPU the worker really uses.  (Mapping by UUID instead would
need CUDA itself, or NVML, in the engine: the order costs nothing.)

A worker that is idle and has loaded torch answers with torch's own figures instead
(engine.server.supervisor asks it first).  The result has "source" saying where it came from.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

# Variables besides TISTUDIO_* that change what a worker does.
ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
               "HF_HUB_CACHE", "PYTORCH_CUDA_ALLOC_CONF")
NVIDIA_SMI_TIMEOUT = 5.0
MIB = 2**20
ORDER_ENV = "CUDA_DEVICE_ORDER"
BUS_ORDER = "PCI_BUS_ID"  # nvidia-smi's order; the engine's workers run with it


def environment(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables set in `env` that matter to a worker: ENVIRONMENT and every TISTUDIO_*
    (but the engine's own bookkeeping)."""
    return {k: env[k] for k in sorted(env)
            if (k in ENVIRONMENT or k.startswith("TISTUDIO_")) and k != "TISTUDIO_ENGINE_PID"}


@dataclass
class Gpu:
    index: int  # as nvidia-smi numbers it (not CUDA's, once CUDA_VISIBLE_DEVICES reorders); a MIG device: its GPU's
    uuid: str  # GPU-… (a MIG device: MIG-…)
    name: str
    total: int | None = None  # bytes
    used: int | None = None
    source: str = "nvidia-smi"
    migs: list["Gpu"] = field(default_factory=list)  # the MIG devices of a GPU in MIG mode, as nvidia-smi -L lists them


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
        found = _describe(index, gpus[index], len(gpus))
        note = _order_note(gpus, env)
        return {**found, "note": note} if note else found
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
    """Every NVIDIA GPU on the machine, in nvidia-smi's order, with its MIG devices; [] when there are none."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            table = _run(smi, "--query-gpu=index,uuid,name,memory.total,memory.used", "--format=csv,noheader,nounits")
        except (OSError, subprocess.SubprocessError):
            table = None  # a broken driver: fall back to what the driver's /proc entries say
        if table is not None:
            try:
                listing = _run(smi, "-L")
            except (OSError, subprocess.SubprocessError):
                listing = ""  # no MIG devices known: a MIG UUID then matches nothing, as before
            try:
                return parse_gpus(table, listing)
            except ValueError:
                pass
    return _driver_gpus()


def _run(smi: str, *args: str) -> str:
    return subprocess.run([smi, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT,
                          check=True).stdout


def parse_gpus(table: str, listing: str = "") -> list[Gpu]:
    """The GPUs of `nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used
    --format=csv,noheader,nounits` (`table`), each with the MIG devices `nvidia-smi -L`
    (`listing`) shows under it."""
    gpus = [_parse_smi(line) for line in table.splitlines() if line.strip()]
    migs = _parse_migs(listing)
    for gpu in gpus:
        gpu.migs = [Gpu(gpu.index, uuid, f"{gpu.name} MIG {profile}") for profile, uuid in migs.get(gpu.uuid, [])]
    return gpus


def _parse_smi(line: str) -> Gpu:
    index, uuid, name, total, used = (part.strip() for part in line.split(","))
    return Gpu(int(index), uuid, name, _mib(total), _mib(used))


# nvidia-smi -L:
#   GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f)
#     MIG 3g.20gb     Device  0: (UUID: MIG-b5e8d4a1-…)          (R470 on; older: MIG-GPU-<uuid>/<gi>/<ci>)
_GPU_LINE = re.compile(r"^GPU \d+: .*\(UUID: (GPU-[^)\s]+)\)")
_MIG_LINE = re.compile(r"^\s+MIG (\S+)\s+Device\s+\d+: \(UUID: (MIG-[^)\s]+)\)")


def _parse_migs(listing: str) -> dict[str, list[tuple[str, str]]]:
    """{GPU uuid: [(MIG profile, MIG uuid), …]} from `nvidia-smi -L`."""
    found: dict[str, list[tuple[str, str]]] = {}
    parent = None
    for line in listing.splitlines():
        if gpu := _GPU_LINE.match(line):
            parent = gpu.group(1)
        elif (mig := _MIG_LINE.match(line)) and parent:
            found.setdefault(parent, []).append((mig.group(1), mig.group(2)))
    return found


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
    """The devices CUDA shows a process, in CUDA's order (cuda:0 first), CUDA_DEVICE_ORDER being
    PCI_BUS_ID (the workers').  Like CUDA, an entry that names no device ends the list; "" or
    "-1" hides them all.  An entry may name a MIG device by its MIG- UUID; a GPU in MIG mode
    stands for its first MIG device; and a process sees one MIG device at most (CUDA 11 and 12
    enumerate a single MIG instance, NVIDIA's MIG user guide), so later ones are left out."""
    entries = [g.index for g in gpus] if cuda_visible_devices is None else \
        [e.strip() for e in cuda_visible_devices.split(",")]
    shown: list[Gpu] = []
    for entry in entries:
        match = _named(entry, gpus)
        device = match.migs[0] if match is not None and match.migs else match
        if device is None or device in shown:
            break
        if not (_is_mig(device) and any(_is_mig(d) for d in shown)):  # one MIG device per process
            shown.append(device)
    return shown


def _named(entry: str | int, gpus: list[Gpu]) -> Gpu | None:
    """The GPU or MIG device a CUDA_VISIBLE_DEVICES entry names: an nvidia-smi index (bus order),
    or a UUID or a unique start of one (GPU-… or MIG-…)."""
    if isinstance(entry, int) or entry.isdigit():
        return next((g for g in gpus if g.index == int(entry)), None)
    if not entry:
        return None
    devices = [d for g in gpus for d in (g, *g.migs)]
    return next((d for d in devices if d.uuid and d.uuid.startswith(entry)), None)


def _is_mig(device: Gpu) -> bool:
    return device.uuid.startswith("MIG-")


def _order_note(gpus: list[Gpu], env: Mapping[str, str]) -> str | None:
    """A warning when CUDA numbers GPUs another way than nvidia-smi and the models differ: the
    names and memory shown may then be another GPU's."""
    order = env.get(ORDER_ENV) or BUS_ORDER
    if order == BUS_ORDER or len({g.name for g in gpus}) < 2:
        return None
    return (f"{ORDER_ENV}={order}: CUDA numbers these GPUs fastest first, nvidia-smi by bus; names and memory "
            f"shown may be another GPU's (unset it, or set {BUS_ORDER})")
