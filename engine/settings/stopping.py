"""Knowing when a word is learned: the settings of probes, the deterministic loss, the stop
rules and the best-step rule, with their checks.  Torch-free, like every settings module: the
CLI and the studio refuse a bad `--stop-when` with the engine's own words before submitting.

The numbers chosen here, and why:

* `--stop-when plateau` is DVAR's rule (Voronov et al., NeurIPS 2023; the official code's
  `VarEarlyStopper`): with the deterministic-loss history L, stop once
  var(last W values) / var(all values) < 0.15 (population variances; the window is part of
  the whole).  Their Textual Inversion setting is a window of 310 evaluations at one per
  step and the threshold 0.15; we evaluate every `--dloss-every` steps (25), so the window
  is kept in steps: 300 steps (12 values at the default), `plateau:STEPS` to change it.
* The best step's default rule ("tradeoff") keeps probes whose editability is at least 60%
  of the SD row's (a tolerance of 40%: the study's own SD+TI row keeps 61%, 0.1611 of 0.2639)
  and takes the highest reconstruction among them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import UserError

PLATEAU_WINDOW_STEPS = 300  # DVAR's window for TI (310 evaluations, one per step), in steps
PLATEAU_THRESHOLD = 0.15  # DVAR's eps for TI: stop when var(window) / var(all) falls below it
EDIT_TOLERANCE = 0.4  # tradeoff: editability may fall this fraction below the SD row's
BEST_RULES = ("tradeoff", "recon", "edit", "balanced")
BEST_TEXT = {
    "tradeoff": f"the highest reconstruction among probes keeping editability within {EDIT_TOLERANCE:.0%} "
                "of the SD row's",
    "recon": "the highest reconstruction",
    "edit": "the highest editability",
    "balanced": "the highest reconstruction + editability",
}
STOP_EXAMPLE = "plateau, recon:0.8, diverged, or several: plateau,diverged"


@dataclass(frozen=True)
class StopRule:
    """One `--stop-when` rule: plateau (window in steps), recon (target), diverged."""

    kind: str
    value: float | None = None

    def describe(self) -> str:
        if self.kind == "plateau":
            return (f"plateau: var(last {int(self.value)} steps of the deterministic loss) / var(all of it) "
                    f"< {PLATEAU_THRESHOLD:g}")
        if self.kind == "recon":
            return f"recon:{self.value:g}: a probe's reconstruction reaches {self.value:g}"
        return "diverged: the word's norm runs far past the vocabulary's, or the deterministic loss keeps rising"


def parse_stop_when(text) -> list[StopRule]:
    """`--stop-when` as rules ("plateau", "plateau:600", "recon:0.8", "diverged", comma-separated);
    None or "" is none.  Anything else is one line naming a good value."""
    if text is None or text == "":
        return []
    if not isinstance(text, str):
        raise UserError(f"--stop-when must be text: {STOP_EXAMPLE}")
    rules = [_rule(part.strip()) for part in text.split(",")]
    kinds = [r.kind for r in rules]
    if len(set(kinds)) != len(kinds):
        raise UserError(f"--stop-when {text}: give each rule once")
    return rules


def _rule(part: str) -> StopRule:
    kind, colon, raw = part.partition(":")
    if kind == "diverged" and not colon:
        return StopRule("diverged")
    if kind == "plateau":
        if not colon:
            return StopRule("plateau", float(PLATEAU_WINDOW_STEPS))
        if raw.isdigit() and int(raw) >= 1:
            return StopRule("plateau", float(int(raw)))
        raise UserError(f"--stop-when {part}: the window after 'plateau:' is a whole number of steps, e.g. plateau:300")
    if kind == "recon" and colon:
        value = _number(raw)
        if 0 < value <= 1:
            return StopRule("recon", value)
        raise UserError(f"--stop-when {part}: reconstruction is a CLIP cosine; give a target above 0 and at most 1, "
                        "e.g. recon:0.8")
    raise UserError(f"unknown --stop-when rule {part!r}; use {STOP_EXAMPLE}")


def _number(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def plateau_window(rule: StopRule, dloss_every: int) -> int:
    """How many deterministic-loss values the plateau window holds (at least 2: a variance)."""
    return max(2, round(rule.value / dloss_every))


def checks(config):
    """(ok, message) for each probe / deterministic-loss / stopping setting of a TrainConfig
    (engine.settings.train runs them with its own)."""
    yield _whole(config.probe_every, 0), "--probe-every must be 0 (off) or a positive whole number, e.g. 500"
    yield _whole(config.probe_images, 1), "--probe-images must be a whole number of at least 1"
    yield _whole(config.probe_edit_images, 1), "--probe-edit-images must be a whole number of at least 1"
    yield _whole(config.probe_steps, 1), "--probe-steps must be a whole number of at least 1"
    yield _whole(config.dloss_every, 0), "--dloss-every must be 0 (off) or a positive whole number, e.g. 25"
    yield config.best_by in BEST_RULES, f"--best-by must be one of {', '.join(BEST_RULES)}"
    rules = parse_stop_when(config.stop_when)
    kinds = {r.kind for r in rules}
    yield ("plateau" not in kinds or config.dloss_every > 0,
           "--stop-when plateau watches the deterministic loss; give --dloss-every N above 0, e.g. 25")
    yield ("recon" not in kinds or config.probe_every > 0,
           "--stop-when recon:X reads the probes; give --probe-every N above 0, e.g. 500")


def _whole(x, least: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= least
