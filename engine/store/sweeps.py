"""A sweep job's members on disk, and how they are split into groups (torch-free).

A sweep job trains K member runs together; each member is a full run directory of kind
"train" whose `parent` names the job.  The server plans a split sweep from these (which
members are left, at which checkpoint step) and the workers train them
(engine.worker.sweeps); both split the same way (`chunk`).
"""

from __future__ import annotations

from pathlib import Path

from engine.store.runs import create_run, load_run, update_run


def chunk(ids: list[str], count: int) -> list[list[str]]:
    """`ids` in `count` contiguous groups whose sizes differ by at most one (the first ones
    larger): how a sweep's members are split, the same on the server and in the worker."""
    count = max(1, min(count, len(ids)))
    size, extra = divmod(len(ids), count)
    groups, start = [], 0
    for g in range(count):
        end = start + size + (1 if g < extra else 0)
        groups.append(list(ids[start:end]))
        start = end
    return groups


def member_states(run_dir: Path) -> list[tuple[str, int]] | None:
    """(member id, its latest checkpoint step) for each member of sweep job `run_dir` not yet
    done, in the job's order; None when the job has made no members yet.  Torch-free: the
    server plans a split resume from it."""
    names = load_run(run_dir).get("members") or []
    if not names:
        return None
    dirs = [Path(run_dir).parent / name for name in names]
    return [(d.name, latest_step(d)) for d in dirs if not is_done(d)]


def latest_step(run_dir: Path) -> int:
    """The step of a run's newest checkpoint, 0 if it has none (found without torch)."""
    from engine.store.checkpoints import list_checkpoints

    found = list_checkpoints(run_dir)
    return found[-1].step if found else 0


def is_done(run_dir: Path) -> bool:
    try:
        return load_run(run_dir).get("status") == "done" and (run_dir / "learned_embeds.safetensors").is_file()
    except (OSError, ValueError):
        return False


def sweep_result(run_dir: Path) -> dict:
    """What a finished sweep job made, read from its members' records (torch-free: the server
    writes it for a sweep split over workers)."""
    names = load_run(run_dir).get("members") or []
    embeddings = []
    for name in names:
        try:
            embeddings.append(load_run(Path(run_dir).parent / name).get("embedding"))
        except (OSError, ValueError):
            embeddings.append(None)
    return {"members": names, "embeddings": embeddings}


def create_members(home: Path, concept: str, params_list: list[dict], parent: str | None = None,
                   extra: list[dict] | None = None) -> list[Path]:
    """One queued run per params dict; `parent` and `extra` fields go into each run.json."""
    dirs = []
    for k, params in enumerate(params_list):
        run_dir = create_run(home, {"kind": "train", "concept": concept, "params": params})
        fields = {**({"parent": parent} if parent else {}), **(extra[k] if extra else {})}
        if fields:
            update_run(run_dir, **fields)
        dirs.append(run_dir)
    return dirs
