"""Resumable training state on disk: `checkpoints/step-N/`.

A checkpoint is written into a hidden temp folder and renamed into place, so
`step-N/` either exists whole or not at all — a kill -9 mid-write leaves only
a `.tmp` folder that resume ignores (and removes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.faults import maybe_fault
from engine.paths import _fsync_dir

STATE_FILE = "state.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
ROW_KEYS = ("exp_avg", "exp_avg_sq", "step", "loss_scale", "good_steps", "skipped")


@dataclass
class Checkpoint:
    path: Path
    step: int


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append(Checkpoint(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest(run_dir: Path) -> Checkpoint | None:
    _remove_partial(run_dir)
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _remove_partial(run_dir: Path) -> None:
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".") and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def save_row(run_dir: Path, step: int, row: int, vectors: torch.Tensor, state: dict,
             generator: torch.Generator) -> Path:
    """Save run `row`'s vector, optimizer row and RNG state as `step-N/` (atomically)."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = root / f"step-{step}"
    tensors = {"vector": vectors.detach()[row : row + 1].float().cpu().contiguous()}
    for key in ROW_KEYS:
        tensors[key] = state[key][row : row + 1].detach().cpu().contiguous().clone()
    tensors["rng"] = generator.get_state().clone()
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.", dir=root))
    try:
        save_file(tensors, str(tmp / STATE_FILE), metadata={"step": str(step)})
        maybe_fault("checkpoint.mid_write", step)
        (tmp / "meta.json").write_text(json.dumps({"step": step, "format": 1}))
        for name in (STATE_FILE, "meta.json"):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved again (e.g. cancel right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def restore_row(ckpt: Checkpoint, row: int, vectors: torch.Tensor, state: dict, generator: torch.Generator) -> None:
    tensors = load_file(str(ckpt.path / STATE_FILE))
    with torch.no_grad():
        vectors[row : row + 1].copy_(tensors["vector"].to(vectors.device))
        for key in ROW_KEYS:
            state[key][row : row + 1].copy_(tensors[key].to(state[key].device))
    generator.set_state(tensors["rng"])
