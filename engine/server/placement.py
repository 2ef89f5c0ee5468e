"""Where jobs run: which waiting job a free worker takes, and how a sweep is split over workers.

Pure decisions, no processes: engine.server.scheduler acts on them.

Placement.  Jobs are taken in arrival order, each by the first free worker it fits
(engine.devices.pool.fits: any worker, unless the job asks for a device).  A job waiting for
a busy device does not hold back the jobs behind it that fit another free worker.

Splitting a sweep.  A `sweep` job of K members that finds several free workers it fits is
split over them, one group of members per worker, each group still batched (one UNet
call per step).  It takes G = min(free workers, K // TISTUDIO_SWEEP_MIN_GROUP) workers
(the setting, default 1, is the fewest members a split group trains: 1 spreads a sweep
over every idle worker, up to one member each; a larger value keeps more of the batching
on one device).  G = 1 runs it whole, as before.  Only plain sweeps split; an
experiment job trains its members and then measures them, so it stays on one worker.

On a sweep's first attempt its members do not exist yet: the first group's worker (the
lead) makes and checks them all, while the other G - 1 workers load the model and wait
for the members to appear in the sweep's run.json; then each trains its group of G
(engine.store.sweeps.chunk: the same split everywhere).  On a resume the members are known:
those not done are grouped by the checkpoint step they stand at (runs batched together
share one step counter), and the groups are spread over the free workers (`plan_groups`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from engine.errors import UserError
from engine.settings.train import sweep_members
from engine.store.sweeps import chunk, member_states
from engine.wire.protocol import SweepGroup

MIN_GROUP_ENV = "TISTUDIO_SWEEP_MIN_GROUP"
SPLITTABLE = ("sweep",)  # job kinds whose members may train on several workers


@dataclass
class Plan:
    """How to start one job: a task per entry of `groups`, each on its own worker (None: the whole job)."""

    groups: list[SweepGroup | None] = field(default_factory=lambda: [None])


def min_group(env: Mapping[str, str] = os.environ) -> int:
    raw = (env.get(MIN_GROUP_ENV) or "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{MIN_GROUP_ENV}={raw!r} must be a whole number of members, 1 or more")
    return value


def plan(kind: str, params: dict, run_dir: Path | None, free: int, smallest_group: int = 1) -> Plan:
    """How a job of `kind` starts with `free` workers it fits (see the module's docstring)."""
    if kind not in SPLITTABLE or free < 2 or run_dir is None:
        return Plan()
    states = member_states(run_dir)
    if states is None:  # first attempt: the lead makes the members
        count = min(free, len(sweep_members(params)) // smallest_group)
        if count < 2:
            return Plan()
        return Plan([SweepGroup(i, count, None) for i in range(count)])
    groups = plan_groups(states, free, smallest_group)
    if len(groups) < 2:
        return Plan()
    return Plan([SweepGroup(i, len(groups), members) for i, members in enumerate(groups)])


def plan_groups(states: list[tuple[str, int]], slots: int, smallest_group: int = 1) -> list[list[str]]:
    """Members (id, checkpoint step) as at most `slots` groups: members at one step stay
    together unless a spare worker can take part of them (each part keeping at least
    `smallest_group` members); with more steps than workers, the last worker takes the rest
    (its worker trains them one step-batch after another)."""
    buckets: dict[int, list[str]] = {}
    for member, step in states:
        buckets.setdefault(step, []).append(member)
    ordered = [buckets[step] for step in sorted(buckets, reverse=True)]
    if not ordered:
        return []
    if len(ordered) >= slots:
        rest = [m for bucket in ordered[slots - 1:] for m in bucket]
        return ordered[:slots - 1] + [rest]
    parts = [1] * len(ordered)
    for _ in range(slots - len(ordered)):
        can = [b for b, bucket in enumerate(ordered) if len(bucket) // (parts[b] + 1) >= smallest_group]
        if not can:
            break
        widest = max(can, key=lambda b: len(ordered[b]) / parts[b])
        parts[widest] += 1
    return [group for bucket, n in zip(ordered, parts) for group in chunk(bucket, n)]
