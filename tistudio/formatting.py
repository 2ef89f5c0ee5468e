"""How the studio writes numbers, times and run ids for people, and makes text safe for markup.

The one-line form of an error is `engine.errors.one_line`, shared with the engine and the CLI.
"""

from __future__ import annotations

import math
from typing import Any


def fmt_duration(seconds: Any) -> str:
    """`75` → `1m15s`; `–` for anything that is not a finite, non-negative number."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_bytes(n: Any) -> str:
    """Bytes as GiB (or MiB below one GiB); `–` when unknown."""
    if not isinstance(n, (int, float)):
        return "–"
    gib = n / 1024 ** 3
    return f"{gib:.1f} GiB" if gib >= 1 else f"{n / 1024 ** 2:.0f} MiB"


def device_memory(worker: dict) -> str:
    """One engine worker's device and memory: `cuda:0 2.1 GiB / 8.0 GiB`, `cpu`.  The engine's
    status lists its workers with their figures in `memory` (older shapes: at the top level)."""
    memory = worker.get("memory") if isinstance(worker.get("memory"), dict) else {}
    figures = {**worker, **memory}
    used = figures.get("vram_allocated", figures.get("vram_used_device"))
    text = str(worker.get("device") or "?")
    if isinstance(used, (int, float)):
        text += f" {fmt_bytes(used)}" + (f" / {fmt_bytes(figures['vram_total'])}"
                                         if isinstance(figures.get("vram_total"), (int, float)) else "")
    return text


def engine_workers(status: dict) -> list[dict]:
    """The workers of the engine's status answer (one per device); [] from an engine without them."""
    workers = status.get("workers") if isinstance(status, dict) else None
    return [w for w in workers if isinstance(w, dict)] if isinstance(workers, list) else []


def short_when(run_id: str) -> str:
    """`20260101-093000-ab12` → `01-01 09:30` (run ids start with their UTC creation time)."""
    if len(run_id) >= 15 and run_id[:8].isdigit() and run_id[9:13].isdigit():
        return f"{run_id[4:6]}-{run_id[6:8]} {run_id[9:11]}:{run_id[11:13]}"
    return run_id[:11]


def escape(text: Any) -> str:
    """`text` shown as it is inside Textual markup (a `[` in an error or a path is not a tag)."""
    from textual.markup import escape as markup_escape

    return markup_escape(str(text))


def watch_cells(job: dict) -> tuple[str, str]:
    """A run's best probed step (what NAME@RUN:best picks) and why it stopped: a --stop-when rule at
    its step, or "steps" (it ran them all); empty while unknown."""
    best, stopped = job.get("best"), job.get("stopped")
    best_cell = str(best["step"]) if isinstance(best, dict) and "step" in best else ""
    if not isinstance(stopped, dict):
        return best_cell, ""
    return best_cell, "steps" if stopped.get("rule") == "steps" else f"{stopped.get('rule')} @ {stopped.get('step')}"
