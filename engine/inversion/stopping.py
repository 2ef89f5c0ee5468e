"""The judgements about one run, made from its events alone: warnings, when it stops, its best step.

`Watch.observe` takes a run's events one by one (the live ones as the run emits them, or its
logged history on resume: engine.store.history) and returns what they imply: `warning`,
`best` and `stopped` events.  Nothing else feeds it, so a resumed run that replays its history
up to its checkpoint is in exactly the state an uninterrupted run was in at that step, and
stops at the same step.  Pure Python, no torch: the rules are readable on their own.

The rules (numbers in engine.settings.stopping):

* plateau   DVAR: var(last W deterministic-loss values) / var(all of them) < 0.15.
* recon:X   a probe's reconstruction reaches X.
* diverged  either divergence warning below.
* warnings (each once per run):
    norm      the word's mean vector norm passes NORM_FACTOR x the largest norm of the
              vocabulary (per text encoder; `step` events carry the norms);
    rising    the deterministic loss's mean over the last plateau window is RISE above the
              lowest value before that window (a sustained rise, not one noisy value);
    not-learning   two probes in a row whose reconstruction is not above the SD row's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from engine.settings.stopping import (
    BEST_TEXT,
    EDIT_TOLERANCE,
    PLATEAU_THRESHOLD,
    PLATEAU_WINDOW_STEPS,
    StopRule,
    parse_stop_when,
    plateau_window,
)

NORM_FACTOR = 3.0  # "far past": the word's norm over 3x the vocabulary's largest token norm
RISE = 0.10  # a sustained rise: the recent window's mean 10% above the lowest value before it
NOT_LEARNING_PROBES = 2  # probes in a row at or below the SD row's reconstruction


@dataclass
class Watch:
    """One run's judgements.  `vocab_max`: the largest token-embedding norm per text encoder."""

    rules: list[StopRule]
    best_by: str
    dloss_every: int
    vocab_max: list[float]
    dloss: list[float] = field(default_factory=list)
    sd: dict | None = None  # the SD row's probe
    probes: list[dict] = field(default_factory=list)  # the word's probes: step, reconstruction, editability
    warned: dict = field(default_factory=dict)  # warning kind -> the warning (step, kind, message)
    best: dict | None = None
    stopped: dict | None = None

    @classmethod
    def for_config(cls, config, vocab_max: list[float]) -> "Watch":
        return cls(parse_stop_when(config.stop_when), config.best_by, config.dloss_every, list(vocab_max))

    @property
    def window(self) -> int:
        """Deterministic-loss values in the plateau (and rising) window."""
        plateau = next((r for r in self.rules if r.kind == "plateau"), StopRule("plateau", PLATEAU_WINDOW_STEPS))
        return plateau_window(plateau, self.dloss_every or 1)

    def observe(self, event: dict) -> list[dict]:
        """Fold one event in; the events it implies (type and fields, step included)."""
        kind, step = event.get("type"), event.get("step")
        if self.stopped is not None or not isinstance(step, int):
            return []
        found: list[dict] = []
        if kind == "dloss" and isinstance(event.get("dloss"), (int, float)):
            self.dloss.append(float(event["dloss"]))
            found += self._warn("rising", step, self._rising())
            found += self._stop(step, "plateau", self._plateau())
        elif kind == "step":
            found += self._warn("norm", step, self._norm_past(event))
        elif kind == "probe" and event.get("row") == "SD":
            self.sd = _scores(event)
        elif kind == "probe":
            self.probes.append(_scores(event))
            found += self._warn("not-learning", step, self._not_learning())
            found += self._best(step)
            found += self._stop(step, "recon", self._recon_reached())
        if any(e["type"] == "warning" and e["kind"] in ("norm", "rising") for e in found):
            found += self._stop(step, "diverged", "the word diverged (see the warning)")
        return found

    # --- the rules: each returns why it fires, or None ----------------------------------------

    def _plateau(self) -> str | None:
        w, values = self.window, self.dloss
        if len(values) < w + 1:  # DVAR waits for a full window; one more so the whole is larger
            return None
        whole = statistics.pvariance(values)
        ratio = statistics.pvariance(values[-w:]) / whole if whole > 0 else 0.0
        if ratio < PLATEAU_THRESHOLD:
            return (f"the deterministic loss flattened: variance over the last {w} values is {ratio:.3f} of the "
                    f"run's (< {PLATEAU_THRESHOLD:g})")
        return None

    def _rising(self) -> str | None:
        w, values = self.window, self.dloss
        if len(values) < w + 1:
            return None
        recent, lowest = statistics.fmean(values[-w:]), min(values[:-w])
        if lowest > 0 and recent > lowest * (1 + RISE):
            return (f"the deterministic loss keeps rising: {recent:.4g} over the last {w} values against "
                    f"{lowest:.4g} before (a learning rate too high?)")
        return None

    def _norm_past(self, event: dict) -> str | None:
        norms = event.get("norms") if isinstance(event.get("norms"), list) else [event.get("norm")]
        for e, (norm, vocab) in enumerate(zip(norms, self.vocab_max)):
            if isinstance(norm, (int, float)) and vocab > 0 and (norm > NORM_FACTOR * vocab or norm != norm):
                encoder = f" (text encoder {e + 1})" if len(self.vocab_max) > 1 else ""
                return (f"the word's norm is {norm:.3g}{encoder}, {norm / vocab:.0f}x the vocabulary's largest "
                        f"({vocab:.3g}): lower --lr, or regularise (--regularize norm)")
        return None

    def _not_learning(self) -> str | None:
        recent = self.probes[-NOT_LEARNING_PROBES:]
        if self.sd is None or len(recent) < NOT_LEARNING_PROBES:
            return None
        if all(p["reconstruction"] <= self.sd["reconstruction"] for p in recent):
            return (f"the last {NOT_LEARNING_PROBES} probes' reconstruction ({recent[-1]['reconstruction']:.3f}) is "
                    f"not above SD's with the description ({self.sd['reconstruction']:.3f}): the word is not "
                    "learning the concept (check the images, --lr, --init)")
        return None

    def _recon_reached(self) -> str | None:
        target = next((r.value for r in self.rules if r.kind == "recon"), None)
        got = self.probes[-1]["reconstruction"]
        return None if target is None or got < target else f"a probe's reconstruction reached {got:.3f} (>= {target:g})"

    # --- what they imply ------------------------------------------------------------------------

    def _warn(self, kind: str, step: int, why: str | None) -> list[dict]:
        if why is None or kind in self.warned:
            return []
        self.warned[kind] = {"step": step, "kind": kind, "message": why}
        return [{"type": "warning", **self.warned[kind]}]

    def _stop(self, step: int, rule: str, why: str | None) -> list[dict]:
        if why is None or self.stopped is not None or rule not in {r.kind for r in self.rules}:
            return []
        self.stopped = {"step": step, "rule": rule, "why": why}
        return [{"type": "stopped", **self.stopped}]

    def _best(self, step: int) -> list[dict]:
        best = choose_best(self.probes, self.sd, self.best_by)
        if best == self.best:
            return []
        self.best = best
        return [{"type": "best", "step": step, "best": best}]


def choose_best(probes: list[dict], sd: dict | None, rule: str) -> dict | None:
    """The best probed step by `rule` ({step, rule, why, reconstruction, editability}), or None.
    tradeoff without an SD row, or with no probe inside the tolerance, falls back to balanced."""
    if not probes:
        return None
    pool, used = probes, rule
    if rule == "tradeoff":
        floor = sd["editability"] * (1 - EDIT_TOLERANCE) if sd else None
        pool = [p for p in probes if floor is not None and p["editability"] >= floor]
        if not pool:
            pool, used = probes, "balanced"
    key = {"edit": lambda p: p["editability"], "balanced": lambda p: p["reconstruction"] + p["editability"]}.get(
        used, lambda p: p["reconstruction"])
    pick = max(pool, key=key)  # the earliest of equals: max keeps the first
    why = BEST_TEXT[used] if used == rule else f"no probe kept editability within {EDIT_TOLERANCE:.0%} of the " \
                                               f"SD row's; {BEST_TEXT['balanced']}"
    return {"step": pick["step"], "rule": rule, "why": why, "reconstruction": pick["reconstruction"],
            "editability": pick["editability"]}


def _scores(event: dict) -> dict:
    return {"step": event["step"], "reconstruction": float(event["reconstruction"]),
            "editability": float(event["editability"])}
