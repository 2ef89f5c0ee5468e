"""The Train screen's live view of one run: its title and progress, its figures (it/s, ETA,
loss, lr and the run's facts), what its probes say (best step, warnings, why it stopped), the
loss chart (with the deterministic loss) with the vector's norm and cosine and the live
trade-off beside it, the latest preview, and VRAM.  Drawn from the run's events
(tistudio.state.RunTrack)."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import ProgressBar, Static

from tistudio.formatting import escape, fmt_duration
from tistudio.widgets.charts import LossChart, TradeoffChart, VectorChart, VramChart
from tistudio.widgets.images import ImagePreview

STATUS_MARK = {"running": "▶", "queued": "…", "done": "✓", "failed": "✗", "cancelled": "■", "interrupted": "⚠"}


class RunView:
    """Draws one run into the widgets `compose` yields; they sit in the screen's own layout (the
    Train screen's live column), so this is a drawer over them rather than a container."""

    def __init__(self, screen):
        self.screen = screen
        self.device: str | None = None
        self.compact = False  # too narrow for a third chart: the trade-off waits for a wider screen
        self._probed = False  # the shown run has probes (the trade-off chart has something to draw)

    def query_one(self, *args):
        return self.screen.query_one(*args)

    def run_worker(self, *args, **kwargs):
        return self.screen.run_worker(*args, **kwargs)

    @staticmethod
    def compose() -> ComposeResult:
        yield Static("", id="run-title")
        with Horizontal(id="run-progress"):
            yield ProgressBar(total=1, show_eta=False, id="progress")
            yield Static("", id="run-step")
        yield Static("", id="run-stats")
        yield Static("", id="run-watch")
        with Horizontal(id="train-charts"):
            yield LossChart(id="loss")
            yield VectorChart(id="vector")
            yield TradeoffChart(id="tradeoff")
            yield ImagePreview(None, "", empty="no preview yet", id="preview")
        yield VramChart(id="vram")
        yield Static("VRAM: no figures yet (reported on CUDA devices)", id="vram-note")

    def show(self, run_id: str | None, job: dict, track, device: str | None) -> None:
        """Run `run_id`: its record in the engine's listing (`job`) and what its events said
        (`track`: tistudio.state.RunTrack, or None); `device`: the engine's, for the VRAM note."""
        self.device = device
        title = self.query_one("#run-title", Static)
        stats = self.query_one("#run-stats", Static)
        bar = self.query_one("#progress", ProgressBar)
        if not run_id:
            title.update("No runs yet: press s to start one.")
            stats.update("")
            self.query_one("#run-step", Static).update("")
            bar.update(total=1, progress=0)
            self.query_one("#loss", LossChart).set_data([], [])
            self._show_watch(None)
            self.query_one("#vector", VectorChart).set_data([], [], [], None)
            self.query_one("#vram", VramChart).set_data([], [], [], None)
            self._show_vram(False)
            self.run_worker(self.query_one("#preview", ImagePreview).set_image(None, ""), group="preview")
            return
        status = (track.status if track and track.status else None) or job.get("status") or "?"
        steps = (track.steps if track else None) or job.get("steps")
        step = (track.step if track and track.xs else None) or job.get("step") or 0
        mark = STATUS_MARK.get(status, "")
        error = (track.error if track else None) or job.get("error")
        title.update(f"[b]{job.get('concept') or (track.concept if track else '') or ''}[/b] · {run_id} · "
                     f"{mark} {status}" + (f" — [red]{escape(error)}[/red]" if error and status != "done" else ""))
        bar.update(total=steps or 1, progress=min(step, steps) if steps else 0)
        self.query_one("#run-step", Static).update(f"{step}/{steps or '?'}")
        parts = []
        if track and track.steps_per_s and status == "running":
            parts.append(f"{track.steps_per_s:.2f} it/s")
            parts.append(f"ETA {fmt_duration(track.eta)}")
        elif track and track.elapsed is not None:
            parts.append(f"took {fmt_duration(track.elapsed)}" if status == "done" else
                         f"{fmt_duration(track.elapsed)} in")
        if track and track.loss:
            smooth = track.smoothed_loss()
            parts.append(f"loss {track.loss[-1]:.4f}" + (f" (smoothed {smooth:.4f})" if smooth is not None else ""))
        if track and track.lr is not None:
            parts.append(f"lr {track.lr:.2g}")
        parts += run_facts(track.header if track else {}, job, track.reg[-1] if track and track.reg else None)
        stats.update(" · ".join(parts))
        self._show_watch(track)
        if track:
            self.query_one("#loss", LossChart).set_data(track.xs, track.loss, track.watch.dloss_steps,
                                                        track.watch.dloss)
            vocab = track.header.get("vocab_norms") or [None]
            self.query_one("#vector", VectorChart).set_data(track.vec_steps, track.norm, track.cos_init,
                                                             vocab[0], track.norms, track.cos_inits)
            self.query_one("#vram", VramChart).set_data(track.vram_steps, track.vram_allocated,
                                                         track.vram_reserved, track.vram_total)
            preview = track.previews[-1] if track.previews else None
        else:
            preview = None
        self._show_vram(bool(track and track.vram_steps))
        image = self.query_one("#preview", ImagePreview)
        if preview:
            self.run_worker(image.set_image(preview["path"], f"step {preview.get('step')}"), group="preview")
        else:
            self.run_worker(image.set_image(None, ""), group="preview")

    def _show_watch(self, track) -> None:
        """What the run's probes and rules said (shown only for a run that has any): the best step,
        why it stopped, its warnings; and the trade-off chart of its probes."""
        watch = track.watch if track else None
        line, chart = self.query_one("#run-watch", Static), self.query_one("#tradeoff", TradeoffChart)
        self._probed = bool(watch and (watch.sd or watch.probes))
        if self._show_tradeoff():
            chart.set_points(watch.sd, watch.probes, watch.best)
        parts = watch_parts(watch) if watch else []
        line.display = bool(parts)
        line.update(" · ".join(parts))

    def _show_tradeoff(self) -> bool:
        """The trade-off chart shows when the run has probes and the screen has room for it."""
        chart = self.query_one("#tradeoff", TradeoffChart)
        chart.display = self._probed and not self.compact
        return chart.display

    def place(self, compact: bool, preview_beside_loss: bool) -> None:
        """Wide enough: loss, vector and preview side by side.  Compact: loss and one of the two."""
        self.compact = compact
        self._show_tradeoff()
        self.query_one("#vector", VectorChart).display = not (compact and preview_beside_loss)
        self.query_one("#preview", ImagePreview).display = not compact or preview_beside_loss

    def _show_vram(self, has_data: bool) -> None:
        self.query_one("#vram", VramChart).display = has_data
        note = self.query_one("#vram-note", Static)
        note.display = not has_data
        if not has_data:
            device = self.device
            note.update(f"VRAM: not reported on {device}" if device and not device.startswith("cuda")
                        else "VRAM: no figures yet (reported on CUDA devices)")


def watch_parts(watch) -> list[str]:
    """The watch line: best step (and its rule), the stop (rule, step, why), each warning."""
    parts = []
    if watch.best:
        parts.append(f"best step {watch.best['step']} ({watch.best.get('rule')}: recon "
                     f"{watch.best.get('reconstruction', 0):.3f}, edit {watch.best.get('editability', 0):.3f})")
    if watch.stopped:
        parts.append(f"stopped at {watch.stopped.get('step')}: {escape(watch.stopped.get('why') or '')}")
    parts += [f"[yellow]⚠ {escape(w.get('message') or '')}[/yellow]" for w in watch.warnings]
    return parts


def run_facts(header: dict, job: dict, penalty: float | None = None) -> list[str]:
    """What a run trains and how, for its stats line: the model family, the vectors of its word,
    the effective batch, the regularizer (with its latest penalty), low VRAM.  The run's header
    event says it; a run from before headers falls back to its params."""
    from engine.sd.family import FAMILY_LABELS

    params = job.get("params") if isinstance(job.get("params"), dict) else {}
    facts = {**params, **header}
    parts = []
    family = header.get("family") or ((job.get("model") or {}).get("family") if isinstance(job.get("model"), dict)
                                       else None)
    if family:
        parts.append(FAMILY_LABELS.get(family, str(family)))
    vectors = facts.get("vectors")
    if isinstance(vectors, int) and (header or vectors > 1):
        parts.append(f"{vectors} vector{'s' if vectors != 1 else ''}")
    batch, accum = facts.get("batch_size", 1), facts.get("grad_accum", 1)
    if isinstance(batch, int) and isinstance(accum, int):
        effective = facts.get("effective_batch") or batch * accum
        if accum > 1:
            parts.append(f"batch {batch}×{accum} = {effective}")
        elif header:
            parts.append(f"batch {effective}")
    method = facts.get("regularize")
    if method and method != "none":
        weight = facts.get("reg_weight")
        parts.append(f"reg {method}" + (f" λ {weight:g}" if isinstance(weight, (int, float)) and weight else "")
                     + (f" (penalty {penalty:.3g})" if penalty is not None else ""))
    elif header:
        parts.append("reg none")
    if facts.get("init_from"):
        start = str(facts["init_from"])
        parts.append(f"from {start if '@' in start else Path(start).name}")
    if params.get("low_vram"):
        parts.append("low VRAM")
    if facts.get("deterministic"):
        parts.append("deterministic")
    return parts + _data_facts(facts)


def _data_facts(facts: dict) -> list[str]:
    """What the run trains on beyond the images (issue 26): buckets, masks, captions, EMA.  The
    header gives the buckets made and how many images had a mask or a caption; params, the switches."""
    parts = []
    buckets = facts.get("buckets")
    if isinstance(buckets, list):
        parts.append(f"{len(buckets)} bucket{'s' if len(buckets) != 1 else ''}")
    elif buckets is True:
        parts.append("buckets")
    if facts.get("masked_loss"):
        masked = facts.get("masked")
        parts.append(f"masked loss ({masked} mask{'s' if masked != 1 else ''})" if isinstance(masked, int)
                     else "masked loss")
    if isinstance(facts.get("captioned"), int) and facts["captioned"]:
        parts.append(f"{facts['captioned']} captioned")
    if isinstance(facts.get("ema"), (int, float)) and facts["ema"]:
        parts.append(f"EMA {facts['ema']:g}")
    return parts
