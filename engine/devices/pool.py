"""The devices the engine runs its workers on, one worker per device, found without torch.

    TISTUDIO_DEVICES=auto           every CUDA device this process sees (the default), else one `cpu`
    TISTUDIO_DEVICES=cuda:0,cuda:2  exactly these (a device may repeat: `cpu,cpu` is two CPU workers)

With TISTUDIO_DEVICES unset, a TISTUDIO_DEVICE set (the one-device setting) names the
single worker's device.  Devices are named the way torch names them in the engine's own
process (`cuda:N` counts the GPUs $CUDA_VISIBLE_DEVICES leaves visible), and that one name
is used everywhere: the worker's environment, a job's `--device`, run.json's `device`,
and `engine status`.

Each worker gets its device as $TISTUDIO_DEVICE (engine.devices.runtime.pick_device honours it and
makes it torch's current CUDA device, so library code that says "cuda" lands on it too).
CPU workers sharing a box split its cores: each gets $OMP_NUM_THREADS = cores / CPU workers
(at least 1), unless OMP_NUM_THREADS is set already, so two CPU workers really run side by
side instead of fighting over every core.

Every worker runs with CUDA_DEVICE_ORDER=PCI_BUS_ID unless the user set an order: CUDA then
numbers GPUs as nvidia-smi does (by bus, not fastest first), so on a box of mixed models
`cuda:1` is the GPU whose name and memory engine.devices.probe reads for it.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from engine.devices import probe as device_probe
from engine.errors import UserError

DEVICES_ENV = "TISTUDIO_DEVICES"
RAY_ADDRESS_ENV = "TISTUDIO_RAY_ADDRESS"  # run the workers on a Ray cluster instead (engine.server.ray_workers)
NO_RAY = ("", "off", "none", "local")
_NAME = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def engine_devices(env: Mapping[str, str] = os.environ) -> list[str]:
    """The device of each worker, in order: $TISTUDIO_DEVICES, else $TISTUDIO_DEVICE (one
    worker), else `auto`.  UserError for a list that names something that is not a device."""
    raw = (env.get(DEVICES_ENV) or "").strip()
    if not raw:
        single = (env.get("TISTUDIO_DEVICE") or "").strip()
        raw = single or "auto"
        origin = "TISTUDIO_DEVICE" if single else DEVICES_ENV
    else:
        origin = DEVICES_ENV
    if raw == "auto":
        return auto_devices(env)
    names = [part.strip() for part in raw.split(",")]
    bad = [name for name in names if not _NAME.match(name)]
    if bad:
        raise UserError(f"{origin}={raw!r}: {bad[0]!r} is not a device; give auto, or a comma list of "
                        "cpu and cuda:N (e.g. cuda:0,cuda:2 or cpu,cpu)")
    return [normalise(name) for name in names]


def ray_address(value: str | None = None, env: Mapping[str, str] = os.environ) -> str | None:
    """The Ray cluster to run jobs on (`value`, else $TISTUDIO_RAY_ADDRESS): "auto" or an address;
    None to run them on this machine's devices (unset, or off)."""
    raw = (value if value is not None else env.get(RAY_ADDRESS_ENV, "")).strip()
    return None if raw.lower() in NO_RAY else raw


def auto_devices(env: Mapping[str, str] = os.environ) -> list[str]:
    """Every CUDA device a worker could use (torch a CUDA build, GPUs visible), else one CPU."""
    if device_probe.torch_has_cuda():
        gpus = device_probe.visible(device_probe.all_gpus(), env.get("CUDA_VISIBLE_DEVICES"))
        if gpus:
            return [f"cuda:{i}" for i in range(len(gpus))]
    return ["cpu"]


def normalise(name: str) -> str:
    """`cuda` is `cuda:0`, as torch's first device; other names stay."""
    return "cuda:0" if name == "cuda" else name


def fits(requested: str | None, device: str) -> bool:
    """Whether a job that asks for `requested` (a `--device`, or None) may run on a worker
    of `device`: any worker when it asks for none, a worker of that type for a bare type
    (`cuda`, `cpu`), else that device exactly."""
    if not requested:
        return True
    requested = requested.strip()
    if ":" not in requested:
        return device.split(":")[0] == requested
    return requested == device


def check_request(requested: str | None, devices: list[str], where: str = "this engine") -> None:
    """UserError, in one line naming the devices there are, when no worker can take a job
    asking for `requested`."""
    if requested and not any(fits(requested, d) for d in devices):
        there = ", ".join(dict.fromkeys(devices)) or "none"
        raise UserError(f"no worker of {where} has device {requested!r}; its devices: {there} "
                        f"(set ${DEVICES_ENV} before the engine starts, or drop --device)")


def in_bus_order(base: Mapping[str, str]) -> dict[str, str]:
    """`base` with CUDA_DEVICE_ORDER=PCI_BUS_ID, unless it names an order already (the user's wins)."""
    env = dict(base)
    if not env.get(device_probe.ORDER_ENV):
        env[device_probe.ORDER_ENV] = device_probe.BUS_ORDER
    return env


def cpu_threads(devices: list[str], cores: int | None = None) -> int | None:
    """Threads per CPU worker when several share the box (cores / CPU workers, at least 1);
    None with one CPU worker or none (torch's default: every core)."""
    count = sum(1 for d in devices if d == "cpu")
    if count < 2:
        return None
    return max(1, (cores or os.cpu_count() or 1) // count)


def worker_env(device: str, threads: int | None = None,
               base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of the worker for `device` (see the module's docstring)."""
    env = in_bus_order(base)
    env["TISTUDIO_DEVICE"] = device
    if threads and "OMP_NUM_THREADS" not in base:
        env["OMP_NUM_THREADS"] = str(threads)
    return env
