"""The trade-off frontier: every method's Table 1 as a point in the reconstruction/editability plane.

A learned word reconstructs its concept better and obeys the rest of the prompt worse; each
way of training it (`none`, `init-l2:W`, `norm`, `directional`, `cross`, `per-layer` …) is a
point of that plane, and SD alone is another.  Over several training seeds a method's point
is the mean of its runs, with the standard error of each number (sample standard deviation
over sqrt(seeds)).  The Pareto front is the points no other point beats in both numbers
(both higher is better): the methods worth choosing between.

Against `none` on the same seeds, a method's difference is paired seed by seed (`paired`):
the mean of the per-seed differences and its standard error, which the seed's own noise (the
same for both methods) does not inflate.

Pure and torch-free: the experiment's report (engine.worker.experiments) writes it, and the
studio's Study view reads reports of older versions by calling `frontier` itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

KEYS = ("reconstruction", "editability")


@dataclass
class Point:
    """One method (or SD) in the plane: the mean over its runs, and each number's standard error."""

    label: str
    reconstruction: float
    editability: float
    se_reconstruction: float | None = None  # None with one run
    se_editability: float | None = None
    runs: int = 1
    seeds: list = field(default_factory=list)
    front: bool = False  # on the Pareto front
    sd: bool = False  # SD alone (no learned word)

    def as_dict(self) -> dict:
        return asdict(self)


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (sample standard deviation / sqrt(n); None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def method_of(row: dict) -> str:
    """A report row's method: its own `method`, else its regulariser and strength (older reports)."""
    if row.get("method"):
        return str(row["method"])
    reg, weight = row.get("regularize") or "none", row.get("reg_weight") or 0
    return f"{reg}:{weight:g}" if weight else reg


def points(rows: list[dict]) -> list[Point]:
    """One point per method, in the order methods first appear (SD rows: the SD point)."""
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        label = "SD" if row.get("model") == "SD" else method_of(row)
        grouped.setdefault(label, []).append(row)
    found = []
    for label, group in grouped.items():
        (r, se_r), (e, se_e) = (mean_se([float(g[k]) for g in group]) for k in KEYS)
        found.append(Point(label, r, e, se_r, se_e, len(group), [g.get("seed") for g in group], sd=label == "SD"))
    return mark_front(found)


def mark_front(found: list[Point]) -> list[Point]:
    """Set `front` on every point no other point beats in both numbers (ties are not beaten)."""
    for p in found:
        p.front = not any(q is not p and q.reconstruction >= p.reconstruction and q.editability >= p.editability
                          and (q.reconstruction > p.reconstruction or q.editability > p.editability) for q in found)
    return found


def paired(rows: list[dict], method: str, baseline: str = "none") -> dict[str, tuple[float, float | None, int]]:
    """method − baseline on the seeds both have, per number: (mean difference, its standard error, seeds)."""
    by_seed = {}
    for row in rows:
        if row.get("model") != "SD":
            by_seed.setdefault(method_of(row), {})[row.get("seed")] = row
    ours, theirs = by_seed.get(method, {}), by_seed.get(baseline, {})
    seeds = [s for s in ours if s in theirs]
    if not seeds:
        return {}
    out = {}
    for key in KEYS:
        mean, se = mean_se([float(ours[s][key]) - float(theirs[s][key]) for s in seeds])
        out[key] = (mean, se, len(seeds))
    return out


def frontier(rows: list[dict]) -> dict:
    """What a report keeps of its frontier: the points (SD first when measured) and each method's
    paired difference from `none` (when `none` was trained)."""
    found = points(rows)
    labels = [p.label for p in found if not p.sd]
    deltas = {m: paired(rows, m) for m in labels if m != "none"} if "none" in labels else {}
    return {"points": [p.as_dict() for p in found],
            "vs_none": {m: {k: list(v) for k, v in d.items()} for m, d in deltas.items() if d}}


def front_line(points: list[dict]) -> list[dict]:
    """The front's points from left to right (more editability, less reconstruction): the line a
    chart draws through them."""
    return sorted((p for p in points if p.get("front")), key=lambda p: p["editability"])


def label_alignment(points: list[dict]) -> dict[str, str]:
    """Each point's label side on a chart, toward the middle of the editability range (the edges
    would cut it): label -> "left" or "right"."""
    if not points:
        return {}
    middle = (min(p["editability"] for p in points) + max(p["editability"] for p in points)) / 2
    return {p["label"]: "left" if p["editability"] <= middle else "right" for p in points}


def frontier_lines(data: dict) -> list[str]:
    """The frontier as markdown table lines: mean ± standard error per method, front marked."""
    lines = ["| Method | Runs | Reconstruction | Editability | Δ vs none (recon / edit) | Front |",
             "| --- | ---: | ---: | ---: | ---: | :---: |"]
    for p in data.get("points") or []:
        delta = (data.get("vs_none") or {}).get(p["label"], {})
        cells = " / ".join(_pm(*delta[k][:2], signed=True) if k in delta else "–" for k in KEYS) if delta else ""
        lines.append(f"| {p['label']} | {p['runs']} | {_pm(p['reconstruction'], p['se_reconstruction'])} | "
                     f"{_pm(p['editability'], p['se_editability'])} | {cells} | {'★' if p['front'] else ''} |")
    return lines


def _pm(value: float, se: float | None, signed: bool = False) -> str:
    text = f"{value:+.4f}" if signed else f"{value:.4f}"
    return text if se is None else f"{text} ± {se:.4f}"
