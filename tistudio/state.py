"""What the studio knows about the engine and its runs; the screens draw from it.

    StudioState   the engine's state and status, every run record, a RunTrack per followed run
    RunTrack      one run as its events tell it (replayed history, then live): its header (what is
                  trained, how), loss, the vector's norm and cosine to its initializer, the
                  regulariser's penalty, VRAM, previews, images, logs; `apply(events)` folds more in
    WatchTrack    a training run's knowing-when-it-is-learned events: the deterministic loss, the
                  probes (the SD row's too), warnings, its best step and where it stopped

Changed only by the App's message handlers (tistudio.app), read by the screens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.store.runs import ACTIVE, FINAL

MAX_LOG_LINES = 200


@dataclass
class RunTrack:
    """One run as seen through its events (replayed history, then live)."""

    run_id: str
    kind: str | None = None
    concept: str | None = None
    last_seq: int = 0
    status: str | None = None
    error: str | None = None
    result: dict | None = None
    step: int = 0
    steps: int | None = None
    steps_per_s: float | None = None
    eta: float | None = None
    elapsed: float | None = None
    lr: float | None = None
    xs: list[int] = field(default_factory=list)  # logged steps
    loss: list[float] = field(default_factory=list)
    header: dict = field(default_factory=dict)  # the `train` event: family, vectors, widths, batch, regularizer …
    vec_steps: list[int] = field(default_factory=list)  # steps whose event carried the vector's figures
    norm: list[float] = field(default_factory=list)  # encoder 1's mean vector norm
    cos_init: list[float] = field(default_factory=list)  # encoder 1's mean cosine to the initializer
    norms: list[float] = field(default_factory=list)  # the latest norm per text encoder (SDXL: two)
    cos_inits: list[float] = field(default_factory=list)  # the latest cosine per text encoder
    reg_steps: list[int] = field(default_factory=list)
    reg: list[float] = field(default_factory=list)  # the regulariser's penalty (regularised runs only)
    vram_steps: list[int] = field(default_factory=list)
    vram_allocated: list[float] = field(default_factory=list)
    vram_reserved: list[float] = field(default_factory=list)
    vram_total: float | None = None
    previews: list[dict] = field(default_factory=list)  # {step, path, prompt}
    embeddings: list[dict] = field(default_factory=list)  # {step, path, final}
    images: list[dict] = field(default_factory=list)  # generate: {path, mode, seed, prompt}
    progress: float | None = None  # 0..1 for jobs that report a fraction
    logs: list[str] = field(default_factory=list)
    watch: "WatchTrack" = field(default_factory=lambda: WatchTrack())
    complete: bool = False  # its final status is known and its log fully read
    live: bool = False  # seen queued or running: its end happens while we watch
    version: int = 0  # bumped on every change: screens redraw when it moves

    def apply(self, events: list[dict]) -> bool:
        """Fold events in (a seq already seen is skipped); True if anything changed."""
        changed = False
        for event in events:
            seq = event.get("seq")
            if isinstance(seq, int):
                if seq <= self.last_seq:
                    continue
                self.last_seq = seq
            try:
                self._apply_one(event)
            except (TypeError, ValueError, AttributeError, KeyError):
                continue  # an event of a shape we do not know (a newer engine, a hand edit): skip it
            changed = True
        if changed:
            self.version += 1
            # the last status of a batch says whether the run is live: a replayed history
            # holds old running/queued events that must not count
            self.live = self.status in ACTIVE
        return changed

    def _apply_one(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "step":
            self._step(event)
        elif kind == "train":
            self.header = {k: v for k, v in event.items() if k not in ("seq", "t", "type")}
            self.watch.restart(event.get("step"))
        elif kind in WATCH_EVENTS:
            self.watch.apply(kind, event)
        elif kind == "status":
            self.status = event.get("status") or self.status
            if self.status not in FINAL:
                self.complete = False
            self.error = event.get("error") if self.status in ("failed", "interrupted", "cancelled") else None
            if isinstance(event.get("result"), dict):
                self.result = event["result"]
        elif kind == "preview" and event.get("path"):
            self.previews.append({k: event.get(k) for k in ("step", "path", "prompt")})
        elif kind == "embedding":
            self.embeddings.append({k: event.get(k) for k in ("step", "path", "final")})
        elif kind == "image" and event.get("path"):
            if all(img.get("path") != event["path"] for img in self.images):
                self.images.append({k: event.get(k) for k in ("path", "mode", "seed", "prompt")})
        elif kind == "progress":
            fraction = event.get("fraction", event.get("progress"))
            if isinstance(fraction, (int, float)):
                self.progress = float(fraction)
            if event.get("message") or event.get("stage"):
                self._log(str(event.get("message") or event.get("stage")))
        elif kind == "log" and event.get("message"):
            self._log(str(event["message"]))

    def _log(self, line: str) -> None:
        self.logs.append(line)
        del self.logs[:-MAX_LOG_LINES]

    def _step(self, event: dict) -> None:
        step = event.get("step")
        if not isinstance(step, int):
            return
        if self.xs and step <= self.xs[-1]:
            # A resumed run logs again from its checkpoint: keep one history, the latest.
            _cut(step, self.xs, self.loss)
            _cut(step, self.vram_steps, self.vram_allocated, self.vram_reserved)
            _cut(step, self.vec_steps, self.norm, self.cos_init)
            _cut(step, self.reg_steps, self.reg)
        loss = event.get("loss")
        self.xs.append(step)
        self.loss.append(_number(loss))
        self.step = step
        self.steps = event.get("steps") or self.steps
        for name in ("steps_per_s", "eta", "elapsed", "lr"):
            value = event.get(name)
            setattr(self, name, float(value) if isinstance(value, (int, float)) else None)
        if isinstance(event.get("vram_allocated"), (int, float)):
            self.vram_steps.append(step)
            self.vram_allocated.append(float(event["vram_allocated"]))
            self.vram_reserved.append(float(event.get("vram_reserved") or 0.0))
            if event.get("vram_total"):
                self.vram_total = float(event["vram_total"])
        if isinstance(event.get("norm"), (int, float)):
            self.vec_steps.append(step)
            self.norm.append(float(event["norm"]))
            self.cos_init.append(_number(event.get("cos_init")))
            self.norms = [_number(v) for v in event.get("norms") or [event["norm"]]]
            self.cos_inits = [_number(v) for v in event.get("cos_inits") or [event.get("cos_init")]]
        if isinstance(event.get("reg"), (int, float)):
            self.reg_steps.append(step)
            self.reg.append(float(event["reg"]))

    def smoothed_loss(self) -> float | None:
        from tistudio.widgets.charts import ema

        values = ema(self.loss)
        return values[-1] if values else None


WATCH_EVENTS = ("watch", "dloss", "probe", "best", "warning", "stopped")


@dataclass
class WatchTrack:
    """Knowing when the word is learned, as a run's events tell it (engine.inversion.monitor)."""

    plan: dict = field(default_factory=dict)  # the `watch` event: cadences, stop rules, best rule
    dloss_steps: list[int] = field(default_factory=list)
    dloss: list[float] = field(default_factory=list)  # the deterministic loss
    sd: dict | None = None  # the SD row's probe
    probes: list[dict] = field(default_factory=list)  # the word's probes: step, reconstruction, editability, images
    warnings: list[dict] = field(default_factory=list)  # step, kind, message
    best: dict | None = None  # step, rule, why, reconstruction, editability
    stopped: dict | None = None  # step, rule, why

    def restart(self, step) -> None:
        """A (resumed) attempt starts at `step`: what an earlier one logged after it never counted."""
        if not isinstance(step, int):
            return
        _cut(step + 1, self.dloss_steps, self.dloss)
        self.probes = [p for p in self.probes if p["step"] <= step]
        self.warnings = [w for w in self.warnings if (w.get("step") or 0) <= step]
        if self.stopped and self.stopped.get("step", 0) > step:
            self.stopped = None

    def apply(self, kind: str, event: dict) -> None:
        step = event.get("step")
        if kind == "watch":
            self.plan = {k: v for k, v in event.items() if k not in ("seq", "t", "type")}
            self.best, self.stopped = event.get("best"), event.get("stopped")
        elif kind == "dloss" and isinstance(step, int):
            if self.dloss_steps and step <= self.dloss_steps[-1]:
                _cut(step, self.dloss_steps, self.dloss)
            self.dloss_steps.append(step)
            self.dloss.append(_number(event.get("dloss")))
        elif kind == "probe" and event.get("row") == "SD":
            self.sd = _probe(event)
        elif kind == "probe":
            self.probes = [p for p in self.probes if p["step"] < step] + [_probe(event)]
        elif kind == "best":
            self.best = event.get("best")
        elif kind == "warning":
            self.warnings.append({k: event.get(k) for k in ("step", "kind", "message")})
        elif kind == "stopped":
            self.stopped = {k: event.get(k) for k in ("step", "rule", "why")}


def _probe(event: dict) -> dict:
    return {"step": int(event["step"]), "reconstruction": float(event["reconstruction"]),
            "editability": float(event["editability"]), "images": event.get("images") or []}


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _cut(step: int, steps: list[int], *series: list) -> None:
    """Drop the points at `step` and after (a resumed run logs them again)."""
    keep = sum(1 for s in steps if s < step)
    for values in (steps, *series):
        del values[keep:]


@dataclass
class StudioState:
    """Everything the screens draw from; changed only by the App's message handlers."""

    engine: str = "offline"  # offline | starting | online | lost | failed | disabled
    engine_detail: str = ""
    status: dict = field(default_factory=dict)
    jobs: list[dict] = field(default_factory=list)  # run.json records (oldest first)
    tracks: dict[str, RunTrack] = field(default_factory=dict)

    def track(self, run_id: str, job: dict | None = None) -> RunTrack:
        track = self.tracks.get(run_id)
        if track is None:
            track = self.tracks[run_id] = RunTrack(run_id)
        job = job or self.job(run_id)
        if job:
            track.kind = job.get("kind") or track.kind
            track.concept = job.get("concept") or track.concept
        return track

    def job(self, run_id: str | None) -> dict | None:
        if not run_id:
            return None
        for job in reversed(self.jobs):
            if job.get("id") == run_id:
                return job
        return None

    def jobs_of(self, kind: str, concept: str | None = None) -> list[dict]:
        return [j for j in self.jobs if j.get("kind") == kind and (concept is None or j.get("concept") == concept)]

    def queued(self) -> list[dict]:
        return sorted((j for j in self.jobs if j.get("status") == "queued"),
                      key=lambda j: (j.get("position") or 10**6, j.get("created") or 0))

    def running(self) -> dict | None:
        for job in self.jobs:
            if job.get("status") == "running":
                return job
        return None


def is_active(job: dict | None) -> bool:
    """Queued or running."""
    return bool(job) and job.get("status") in ACTIVE
