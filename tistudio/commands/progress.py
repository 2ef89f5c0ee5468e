"""A rich progress bar fed by a run's events (replayed history, then live)."""

from __future__ import annotations

import json
import sys


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

    def __enter__(self):
        if not self.raw:
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
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
        kind = event.get("type")
        if kind == "status" and event.get("status") == self.status and not event.get("error"):
            return  # the worker and the trainer both announce "running"
        if kind == "status":
            self.status = event.get("status")
            self.error = event.get("error") or self.error
            self._say(f"status: {self.status}" + (f" ({self.error})" if event.get("error") else ""))
        elif kind == "step" and self._progress:
            steps = event.get("steps")
            self._progress.update(
                self._task, completed=event["step"], total=steps, count=f"{event['step']}/{steps} steps",
                detail=f"loss {event['loss']:.4f} · {event.get('steps_per_s', 0):.1f} steps/s",
            )
        elif kind == "progress" and self._progress:  # jobs without steps (generate, eval): a fraction
            fraction = event["fraction"]
            self._progress.update(self._task, completed=round(1000 * fraction), total=1000,
                                  count=f"{100 * fraction:.0f}%", detail=str(event.get("message", ""))[:40])
        elif kind in ("preview", "log", "result"):
            self._say(f"{kind}: {event.get('path') or event.get('message') or ''}")

    def note(self, text: str) -> None:
        self._say(text)

    def _say(self, text: str) -> None:
        if self._progress:
            self._progress.console.print(text)

    def exit_code(self) -> int:
        if self.status == "done":
            return 0
        if self.status == "cancelled":
            return 130
        return 1
