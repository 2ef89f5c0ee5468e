"""Knowing when the word is learned, beside the training loop: the deterministic loss and the
probes when they are due, the warnings, the stop rules and the best step.

`Inversion.run` calls four methods:

    begin()            before the first step: replay the run's history up to its checkpoint
                       (engine.store.history), measure what step 0 lacks (the deterministic
                       loss at the start, the SD row's probe); True when every run had stopped
    after_step(done)   after a step's log line: the deterministic loss and the probes when due;
                       True when the step must be saved (a probe: the best step needs its
                       embedding; a run stopping here)
    settle(done)       after the save: the runs that stop at `done` get their final embedding
                       and go quiet; True once every run has stopped

Each run's reporter is wrapped (`_Watched`): every event it emits also goes into the run's
`Watch` (engine.inversion.stopping), whose conclusions (warnings, best, stopped) follow the
event into the log.  The watch reads events only, so a resume that replays the log decides
as the uninterrupted run did.  In a batch (a sweep), each run stops on its own: its final
embedding is the one at its stopping step, and the others train on (a stopped run's row still
rides along in the batch, unread, so the others' results stay those of their solo runs).
"""

from __future__ import annotations

import contextlib

import torch

from engine.inversion.probes import DeterministicLoss, Prober, judge_or_warning
from engine.inversion.stopping import Watch
from engine.settings.stopping import BEST_TEXT, PLATEAU_THRESHOLD, parse_stop_when
from engine.store.history import run_history


class Monitor:
    def __init__(self, inversion):
        self.inv = inversion
        cfg = inversion.cfg0
        vocab = vocab_max(inversion.encoders)
        self.watches = [Watch.for_config(slot.config, vocab) for slot in inversion.slots]
        self.reporters = [_Watched(slot.reporter, watch) for slot, watch in zip(inversion.slots, self.watches)]
        for slot, reporter in zip(inversion.slots, self.reporters):
            slot.reporter = reporter
        self.dloss = DeterministicLoss(inversion) if cfg.dloss_every else None
        self.prober, self.judge_warning = None, None
        if cfg.probe_every and cfg.probe_every <= cfg.steps:
            needs = any(r.kind == "recon" for s in inversion.slots for r in parse_stop_when(s.config.stop_when))
            spec, self.judge_warning = judge_or_warning(inversion.model, needs)
            self.prober = Prober(inversion, spec) if spec is not None else None

    # --- before the first step ------------------------------------------------------------------

    def begin(self) -> bool:
        start = self.inv.start_step
        history = [run_history(slot.run_dir, upto=start) if start else [] for slot in self.inv.slots]
        for watch, events in zip(self.watches, history):
            for event in events:
                watch.observe(event)
        for k, reporter in enumerate(self.reporters):
            reporter.emit("watch", step=start, **self._plan(k))
            if self.judge_warning:
                reporter.emit("warning", step=start, kind="probes", message=self.judge_warning)
        live = [k for k, w in enumerate(self.watches) if w.stopped is None]
        lacking = [k for k in live if not _has(history[k], "dloss", 0)]
        if self.dloss and start == 0 and lacking:  # the curve's start (DVAR's first value: the untrained word)
            values = self.dloss.values()
            self._emit([{"type": "dloss", "step": 0, "dloss": values[k]} for k in lacking], lacking)
        lacking = [k for k in live if not any(e.get("row") == "SD" for e in history[k] if e.get("type") == "probe")]
        if self.prober and lacking:
            self._emit(self.prober.probe(lacking, None), lacking)  # the SD row, once
        self._finish([k for k in range(self.inv.k) if k not in live])
        return len(self.inv.stopped) == self.inv.k

    def _plan(self, k: int) -> dict:
        """The watch event: how this run is watched, and where a replayed history left it."""
        cfg, watch = self.inv.slots[k].config, self.watches[k]
        return {
            "dloss_every": cfg.dloss_every, "probe_every": cfg.probe_every if self.prober else 0,
            "probe_images": cfg.probe_images, "probe_edit_images": cfg.probe_edit_images,
            "stop_when": [r.describe() for r in watch.rules], "plateau_threshold": PLATEAU_THRESHOLD,
            "best_by": cfg.best_by, "best_rule": BEST_TEXT[cfg.best_by], "vocab_max": watch.vocab_max,
            "best": watch.best, "stopped": watch.stopped, "warned": watch.warned,
        }

    # --- after each step --------------------------------------------------------------------------

    def after_step(self, done: int) -> bool:
        cfg = self.inv.cfg0
        if self.dloss and done % cfg.dloss_every == 0:
            self._emit_dloss(done)
        probed = bool(self.prober and done % cfg.probe_every == 0)
        if probed:
            live = [k for k, _ in self.inv.live()]
            ema = self.inv.ema  # --ema: probe the word as it is saved at this step
            with ema.shown(self.inv.vectors) if ema else contextlib.nullcontext():
                self._emit(self.prober.probe(live, done), live)
        return probed or bool(self._stopping(done))

    def settle(self, done: int) -> bool:
        """The runs stopping at `done` (a rule, or the last step) finish: final embedding, then quiet."""
        stopping = self._stopping(done)
        if done == self.inv.cfg0.steps:
            for k, _ in self.inv.live():
                if k not in stopping:
                    why = f"ran its --steps {done}"
                    self.watches[k].stopped = {"step": done, "rule": "steps", "why": why}
                    self.reporters[k].emit("stopped", step=done, rule="steps", why=why)
                    stopping.append(k)
        self._finish(stopping)
        return len(self.inv.stopped) == self.inv.k

    def _stopping(self, done: int) -> list[int]:
        return [k for k, _ in self.inv.live() if (self.watches[k].stopped or {}).get("step") == done]

    def _finish(self, ks: list[int]) -> None:
        """Runs ks have stopped: each one's final embedding (its vectors at its stopping step), then quiet."""
        for k in ks:
            if k not in self.inv.stopped:
                self.inv._save_embedding(self.watches[k].stopped["step"], final=True, only=[k])
                self.inv.stopped.add(k)
                self.reporters[k].muted = True

    def _emit_dloss(self, step: int) -> None:
        live = [k for k, _ in self.inv.live()]
        values = self.dloss.values()
        self._emit([{"type": "dloss", "step": step, "dloss": values[k]} for k in live], live)

    def _emit(self, events: list[dict], ks: list[int]) -> None:
        """Event i to run ks[i]."""
        for k, event in zip(ks, events, strict=True):
            fields = {key: value for key, value in event.items() if key != "type"}
            self.reporters[k].emit(event["type"], **fields)


class _Watched:
    """A run's reporter with its Watch: each event goes on to the run's own reporter and into the
    watch, and what the watch concludes follows it.  Muted once the run has stopped."""

    def __init__(self, inner, watch: Watch):
        self.inner, self.watch, self.muted = inner, watch, False

    def emit(self, type: str, **fields) -> None:
        if self.muted:
            return
        self.inner.emit(type, **fields)
        for derived in self.watch.observe({"type": type, **fields}):
            self.inner.emit(derived.pop("type"), **derived)

    def cancelled(self) -> bool:
        return self.inner.cancelled()


def vocab_max(encoders) -> list[float]:
    """The largest token-embedding norm of each text encoder's vocabulary."""
    with torch.no_grad():
        return [float(encoder.get_input_embeddings().weight.float().norm(dim=-1).max()) for encoder, _ in encoders]


def _has(events: list[dict], kind: str, step: int) -> bool:
    return any(e.get("type") == kind and e.get("step") == step for e in events)
