"""Progress fed by a run's events (replayed history, then live).

On a terminal: a rich progress bar that redraws in place.  Anywhere else (a log
file, `nohup`, a pipe): plain lines, one every $TISTUDIO_PROGRESS_EVERY steps
(default 100) or every 10% of a job without steps, so logs stay readable.
"""

from __future__ import annotations

import os
import sys

from engine.store.events import json_line

DEFAULT_PLAIN_EVERY = 100


class RunProgress:
    def __init__(self, run_id: str, raw: bool = False, quiet: bool = False):
        from rich.console import Console

        self.run_id = run_id
        self.raw = raw
        # --json commands keep stdout for their JSON: progress goes to stderr
        self.console = Console(stderr=quiet)
        self.status = None
        self.error = None
        self._progress = None
        self._task = None
        self.plain = not raw and not self.console.is_terminal
        self._plain_every = _plain_every()
        self._last_plain: float = -1
        self.dloss: float | None = None  # the latest deterministic loss, shown beside the loss
        self.sd: dict | None = None  # the SD row's probe: each probe line compares with it

    def __enter__(self):
        if not self.raw and not self.plain:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("{task.fields[count]}"), TextColumn("{task.fields[detail]}"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.run_id, total=None, count="", detail="")
        return self

    def __exit__(self, *exc):
        if self._progress:
            self._progress.__exit__(*exc)

    def update(self, event: dict) -> None:
        if self.raw:
            sys.stdout.write(json_line(event).decode("utf-8"))
            sys.stdout.flush()
        kind = event.get("type")
        if kind == "status" and event.get("status") == self.status and not event.get("error"):
            return  # the worker and the trainer both announce "running"
        if kind == "status":
            self.status = event.get("status")
            self.error = event.get("error") or self.error
            self._say(f"status: {self.status}" + (f" ({self.error})" if event.get("error") else ""))
        elif kind in ("step", "progress") and self.plain:
            self._plain_line(event)
        elif kind == "step" and self._progress:
            steps = event.get("steps")
            self._progress.update(
                self._task, completed=event["step"], total=steps, count=f"{event['step']}/{steps} steps",
                detail=f"loss {event['loss']:.4f}{self._dloss()} · {event.get('steps_per_s', 0):.1f} steps/s"
                       f"{_vector(event)}",
            )
        elif kind == "progress" and self._progress:  # jobs without steps (generate, eval): a fraction
            fraction = event["fraction"]
            self._progress.update(self._task, completed=round(1000 * fraction), total=1000,
                                  count=f"{100 * fraction:.0f}%", detail=str(event.get("message", ""))[:40])
        elif kind in WATCHING:
            self._watching(kind, event)
        elif kind == "train" and _data_line(event):
            self._say(_data_line(event))
        elif kind in ("preview", "log", "result"):
            label = "warning" if event.get("level") == "warning" else kind  # e.g. a model read by a guess
            self._say(f"{label}: {event.get('path') or event.get('message') or ''}")

    def _plain_line(self, event: dict) -> None:
        if event.get("type") == "step":
            mark, steps = event["step"], event.get("steps")
            due = mark == steps or mark // self._plain_every > self._last_plain // self._plain_every
            text = (f"{self.run_id} step {mark}/{steps} loss {event['loss']:.4f}{self._dloss()} "
                    f"{event.get('steps_per_s', 0):.1f} steps/s" + _vector(event) + _eta(event.get("eta")))
        else:
            mark = round(100 * event["fraction"])
            due = mark >= 100 or mark // 10 > self._last_plain // 10
            text = f"{self.run_id} {mark}% {event.get('message', '')}".rstrip()
        if due or self._last_plain < 0:
            self._last_plain = mark
            self._say(text)

    def _watching(self, kind: str, event: dict) -> None:
        """Knowing when the word is learned: probes, warnings, the best step, where the run stopped."""
        if kind == "dloss" and isinstance(event.get("dloss"), (int, float)):
            self.dloss = float(event["dloss"])
        elif kind == "probe" and event.get("row") == "SD":
            self.sd = event
            self._say(f"probe SD (the description): {_scores(event)}")
        elif kind == "probe":
            sd = self.sd or {}
            versus = f" (SD {sd['reconstruction']:.3f} / {sd['editability']:.3f})" if _scores(sd) != "?" else ""
            self._say(f"probe step {event.get('step')}: {_scores(event)}{versus}")
        elif kind == "best" and isinstance(event.get("best"), dict):
            best = event["best"]
            self._say(f"best step so far: {best.get('step')} ({best.get('rule')}: {best.get('why')})")
        elif kind == "warning":
            self._say(f"warning: {event.get('message')}")
        elif kind == "stopped":
            self._say(f"stopped at step {event.get('step')} ({event.get('rule')}): {event.get('why')}")

    def _dloss(self) -> str:
        return f" · dloss {self.dloss:.4f}" if self.dloss is not None else ""

    def note(self, text: str) -> None:
        self._say(text)

    def _say(self, text: str) -> None:
        if self._progress:
            self._progress.console.print(text)
        elif self.plain:
            print(text, file=self.console.file, flush=True)

    def exit_code(self) -> int:
        if self.status == "done":
            return 0
        if self.status == "cancelled":
            return 130
        return 1


WATCHING = ("dloss", "probe", "best", "warning", "stopped")


def _data_line(event: dict) -> str:
    """What a run trains on, from its header, when it is more than plain images (issue 26):
    "data: 5 images in 3 buckets (64×64: 2, 88×44: 2, 44×88: 1), 2 with a mask, 4 captioned (135 prompts), EMA 0.99"."""
    buckets, masked, captioned = event.get("buckets"), event.get("masked"), event.get("captioned")
    if not (buckets or (event.get("masked_loss") and masked is not None) or captioned or event.get("ema")):
        return ""
    parts = [f"{event.get('images')} images"]
    if isinstance(buckets, list):
        sizes = ", ".join(f"{b['width']}×{b['height']}: {b['images']}" for b in buckets)
        parts[0] += f" in {len(buckets)} bucket{'s' if len(buckets) != 1 else ''} ({sizes})"
    if event.get("masked_loss"):
        parts.append(f"{masked} with a mask")
    if captioned:
        parts.append(f"{captioned} captioned ({len(event.get('prompts') or [])} prompts)")
    if event.get("ema"):
        parts.append(f"EMA {event['ema']:g}")
    return "data: " + ", ".join(parts)


def _scores(event: dict) -> str:
    recon, edit = event.get("reconstruction"), event.get("editability")
    if not isinstance(recon, (int, float)) or not isinstance(edit, (int, float)):
        return "?"
    return f"reconstruction {recon:.3f} · editability {edit:.3f}"


def _plain_every() -> int:
    raw = os.environ.get("TISTUDIO_PROGRESS_EVERY", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_PLAIN_EVERY


def _eta(seconds) -> str:
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    return f", {minutes}m{secs:02d}s left" if minutes else f", {secs}s left"


def _vector(event: dict) -> str:
    """The word's norm and its cosine to where it started, when the run reports them."""
    if not isinstance(event.get("norm"), (int, float)) or not isinstance(event.get("cos_init"), (int, float)):
        return ""
    return f" · |v| {event['norm']:.3f} cos {event['cos_init']:.3f}"
