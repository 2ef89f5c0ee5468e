"""`tistudio --version`: what a bug report needs, the device included."""

from __future__ import annotations

from importlib import metadata

PACKAGES = ("diffusers", "transformers", "open_clip_torch", "textual", "safetensors")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_report() -> str:
    import platform

    lines = [f"tistudio {_version('tistudio')} (python {platform.python_version()})"]
    lines += _torch_lines()
    lines.append(", ".join(f"{p} {_version(p)}" for p in PACKAGES))
    return "\n".join(lines)


def _torch_lines() -> list[str]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch is exactly what --version must show
        return [f"torch: cannot import ({type(exc).__name__}: {exc})"]
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    lines = [f"torch {torch.__version__} ({build})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"device cuda:{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("device: cpu (no CUDA device visible)")
    return lines
