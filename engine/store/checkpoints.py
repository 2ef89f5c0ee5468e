"""Resumable training state on disk: `checkpoints/step-N/`.

A checkpoint is written into a hidden temp folder and renamed into place, so
`step-N/` either exists whole or not at all — a kill -9 mid-write leaves only
a `.tmp` folder that resume ignores (and removes).

`vector` is the run's whole word as one row (N vectors per text encoder, see
engine.sd.placeholder.WordLayout); meta.json says its shape, so a resume with
another --vectors or model family stops with a message instead of mixing them.
With --keep-checkpoints N, older step folders are pruned after each new one is
in place: renamed to a hidden name first (atomic), then removed, so a kill at
any instant leaves whole checkpoints and hidden litter that resume clears.

Finding checkpoints needs no torch (the engine server plans a split sweep's resume
from them); saving and restoring one imports it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import UserError
from engine.faults import maybe_fault
from engine.store.paths import _fsync_dir

if TYPE_CHECKING:
    import torch

STATE_FILE = "state.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# The optimizer's per-row state (engine.inversion.optim).  `scaling` (whether the run scaled
# its loss) is there from format 3 on; a format-2 checkpoint scaled while its scale was not 1.
ROW_KEYS = ("exp_avg", "exp_avg_sq", "step", "loss_scale", "good_steps", "skipped", "scaling")
FORMAT = 3


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


def save_row(run_dir: Path, step: int, row: int, vectors: torch.Tensor, state: dict, generator: torch.Generator,
             layout=None, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Save run `row`'s vectors, optimizer row and RNG state as `step-N/` (atomically); `extra`:
    more per-run matrices to keep their row of (e.g. "ema", engine.inversion.ema)."""
    from safetensors.torch import save_file

    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = root / f"step-{step}"
    tensors = {"vector": vectors.detach()[row : row + 1].float().cpu().contiguous()}
    for key in ROW_KEYS:
        tensors[key] = state[key][row : row + 1].detach().cpu().contiguous().clone()
    tensors["rng"] = generator.get_state().clone()
    for key, matrix in (extra or {}).items():
        tensors[key] = matrix.detach()[row : row + 1].float().cpu().contiguous()
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.", dir=root))
    try:
        save_file(tensors, str(tmp / STATE_FILE), metadata={"step": str(step)})
        maybe_fault("checkpoint.mid_write", step)
        meta = {"step": step, "format": FORMAT}
        if layout is not None:
            meta.update(vectors=layout.n, widths=list(layout.widths))
            if layout.layers > 1:  # a per-layer word; older checkpoints (one vector set) have no key
                meta["layers"] = layout.layers
        (tmp / "meta.json").write_text(json.dumps(meta))
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


def restore_row(ckpt: Checkpoint, row: int, vectors: torch.Tensor, state: dict, generator: torch.Generator,
                extra: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Restore run `row` from `ckpt`, and its row of each `extra` matrix the checkpoint holds;
    returns the `extra` keys it does not hold (an older checkpoint: the caller starts them)."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt.path / STATE_FILE))
    saved, wanted = tuple(tensors["vector"].shape[1:]), tuple(vectors.shape[1:])
    if saved != wanted:
        raise UserError(
            f"checkpoint {ckpt.path} holds a word of {saved[0]} floats but this run trains {wanted[0]} "
            f"({_described(ckpt)}); resume with the --vectors, --per-layer and model it was started with"
        )
    if "scaling" not in tensors:  # format 2: the rule it was trained by
        tensors["scaling"] = tensors["loss_scale"] != 1.0
    with torch.no_grad():
        vectors[row : row + 1].copy_(tensors["vector"].to(vectors.device))
        for key in ROW_KEYS:
            state[key][row : row + 1].copy_(tensors[key].to(state[key].device))
        for key, matrix in (extra or {}).items():
            if key in tensors:
                matrix[row : row + 1].copy_(tensors[key].to(matrix.device))
    generator.set_state(tensors["rng"])
    return [key for key in (extra or {}) if key not in tensors]


def _described(ckpt: Checkpoint) -> str:
    try:
        meta = json.loads((ckpt.path / "meta.json").read_text())
        layers = f" in each of {meta['layers']} layers (--per-layer)" if meta.get("layers", 1) > 1 else ""
        return f"it was saved with {meta['vectors']} vector(s){layers} of widths {meta['widths']}"
    except (OSError, ValueError, KeyError):
        return "another word size"


def prune(run_dir: Path, keep: int) -> list[int]:
    """Remove all but the newest `keep` (>= 1) checkpoints; return the steps removed.

    Each old folder is first renamed to a hidden name (one atomic step: it stops being a
    checkpoint at once), then deleted; the newest is never touched."""
    keep = max(1, int(keep))
    old = list_checkpoints(run_dir)[:-keep]
    root = checkpoints_dir(run_dir)
    for ckpt in old:
        hidden = root / f".pruned-{ckpt.path.name}"
        shutil.rmtree(hidden, ignore_errors=True)
        os.replace(ckpt.path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    if old:
        _fsync_dir(root)
    return [c.step for c in old]
