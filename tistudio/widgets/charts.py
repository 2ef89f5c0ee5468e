"""Charts drawn with plotext (textual-plotext): loss (with the deterministic loss), the vector (norm,
cosine to its initializer), the live trade-off (probes in the reconstruction/editability plane),
VRAM, metric curves.

Each chart keeps its own copy of the data and redraws only when `set_*` is
given something new; callers throttle (the Train screen redraws at most a
few times a second however fast events come).
"""

from __future__ import annotations

import math

from textual_plotext import PlotextPlot

from engine.store.frontier import front_line, label_alignment
from tistudio.themes import chart_colours

GIB = 1024 ** 3
MAX_POINTS = 600  # plotted points per series; longer histories are thinned evenly


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style smoothing: an exponential moving average, debiased at the start."""
    out, last, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(out[-1] if out else 0.0)
            continue
        n += 1
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight ** n))
    return out


def thin(xs: list, *series: list, limit: int = MAX_POINTS) -> tuple[list, ...]:
    """Keep at most `limit` evenly spaced points (always the last one)."""
    if len(xs) <= limit:
        return (xs, *series)
    stride = len(xs) / limit
    idx = sorted({int(i * stride) for i in range(limit)} | {len(xs) - 1})
    return ([xs[i] for i in idx], *[[s[i] for i in idx] for s in series])


def _rgb(colour: str) -> tuple[int, int, int]:
    from textual.color import Color

    return Color.parse(colour).rgb


class _Chart(PlotextPlot):
    DEFAULT_CSS = "_Chart { height: 1fr; width: 1fr; min-height: 4; }"

    empty_text = "no data yet"

    title = ""
    series: tuple[str, str] = ("", "")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._key: tuple | None = None
        self._legend_colours: tuple[str, str] | None = None

    def on_mount(self) -> None:
        super().on_mount()
        self._empty()

    def _unchanged(self, key: tuple) -> bool:
        """Redraw only when the data (or the theme) changed: plotting is the costly part."""
        if key == self._key:
            return True
        self._key = key
        return False

    def _plot_pair(self, xs: list, first: list, second: list) -> None:
        """The two series, in the theme's colours, on a fresh figure."""
        first_c, second_c = self._colours()
        self._start()
        self.plt.plot(xs, first, color=first_c, marker="braille")
        self.plt.plot(xs, second, color=second_c, marker="braille")

    def _colours(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        theme = self.app.get_theme(self.app.theme) if self.is_attached else None
        raw, smooth = chart_colours(theme)
        self._legend(raw, smooth)
        return _rgb(raw), _rgb(smooth)

    def _legend(self, first: str, second: str) -> None:
        """The series names go in the border title (in their colours): the plot keeps every row."""
        self._legend_colours = (first, second)
        self._show_legend()

    def _show_legend(self) -> None:
        """The chart's title and legend; a narrow chart keeps only the legend (the colours say most)."""
        (first, second), (a, b) = self._legend_colours, self.series
        legend = f"[{first}]━ {a}[/]  [{second}]━ {b}[/]"
        full_width = len(self.title) + len(a) + len(b) + 12  # the title, the legend, the border's corners
        narrow = 0 < self.size.width < full_width
        self.border_title = legend if narrow else f"{self.title}  {legend}"

    def on_resize(self) -> None:
        if self._legend_colours and self._key is not None and self.border_title != self.title:
            self._show_legend()

    def _start(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.frame(False)
        plt.xfrequency(3)
        plt.yfrequency(3)

    def _empty(self) -> None:
        self._start()
        self.border_title = self.title
        self.plt.title(self.empty_text)
        self.refresh()


class LossChart(_Chart):
    """Training loss per logged step, raw and smoothed; over them, when the run computes it, the
    deterministic loss (the same objective on one fixed batch: the curve that tracks quality)."""

    empty_text = "waiting for the first steps"
    title = "Loss"
    series = ("raw", "smoothed")

    def set_data(self, steps: list[int], loss: list[float], dloss_steps: list[int] | None = None,
                 dloss: list[float] | None = None) -> None:
        dloss_steps, dloss = dloss_steps or [], dloss or []
        key = (len(steps), steps[-1] if steps else None, len(dloss_steps), self.app.theme)
        if self._unchanged(key):
            return
        smooth = ema(loss)
        finite = [i for i, v in enumerate(loss) if math.isfinite(v)]
        if not finite:
            self._empty()
            return
        steps, loss, smooth = ([seq[i] for i in finite] for seq in (steps, loss, smooth))
        points = [(x, y) for x, y in zip(dloss_steps, dloss) if math.isfinite(y)]
        self._with_dloss = bool(points)
        self._plot_pair(*thin(steps, loss, smooth))
        self.border_subtitle = ""
        if points:
            xs, ys = thin([x for x, _ in points], [y for _, y in points])
            self.plt.plot(xs, ys, color=_rgb(DLOSS_COLOUR), marker="braille")
            self.border_subtitle = f"deterministic {ys[-1]:.4f}"
        self.refresh()

    def _show_legend(self) -> None:
        super()._show_legend()
        if getattr(self, "_with_dloss", False):
            self.border_title += f"  [{DLOSS_COLOUR}]━ deterministic[/]"


DLOSS_COLOUR = "#4EC9B0"  # the deterministic loss, apart from the theme's raw/smoothed pair


class TradeoffChart(_Chart):
    """The live trade-off: the run's probes as a path in the (editability, reconstruction) plane,
    from the SD row's point (S) to the latest probe, with the best step marked (*)."""

    empty_text = "no probes yet"
    title = "Trade-off: ↑ recon → edit"
    series = ("probes", "S SD · * best")

    def set_points(self, sd: dict | None, probes: list[dict], best: dict | None) -> None:
        key = (tuple((p["step"], p["reconstruction"]) for p in probes), (sd or {}).get("reconstruction"),
               (best or {}).get("step"), self.app.theme)
        if self._unchanged(key):
            return
        if sd is None and not probes:
            self._empty()
            return
        path_c, mark_c = self._colours()
        self._start()
        plt = self.plt
        path = ([sd] if sd else []) + probes
        plt.plot([p["editability"] for p in path], [p["reconstruction"] for p in path], color=path_c,
                 marker="braille")
        if sd:
            plt.scatter([sd["editability"]], [sd["reconstruction"]], color=mark_c, marker="S")
        picked = next((p for p in probes if best and p["step"] == best.get("step")), None)
        if picked:
            plt.scatter([picked["editability"]], [picked["reconstruction"]], color=mark_c, marker="*")
        latest = probes[-1] if probes else sd
        self.border_subtitle = (f"step {latest['step']}: {latest['reconstruction']:.3f} / "
                                f"{latest['editability']:.3f}" if probes else "SD only")
        if picked:
            self.border_subtitle += f" · best {picked['step']}"
        self.refresh()


class VectorChart(_Chart):
    """The learned vector over steps: its mean norm (left axis, with the vocabulary's median norm
    as a reference line) and its mean cosine to the initializer (right axis).  A word whose norm
    runs far past the vocabulary's is the "too strong" word that ignores the rest of a prompt."""

    empty_text = "waiting for the vector's figures"
    title = "Vector"
    series = ("norm", "cos to init")

    def set_data(self, steps: list[int], norm: list[float], cos_init: list[float], vocab_norm: float | None,
                 norms: list[float] | None = None, cos_inits: list[float] | None = None) -> None:
        """Encoder 1's figures over steps; `norms`/`cos_inits`: the latest per encoder (the subtitle)."""
        key = (len(steps), steps[-1] if steps else None, vocab_norm, tuple(norms or ()), self.app.theme)
        if self._unchanged(key):
            return
        finite = [i for i, v in enumerate(norm) if math.isfinite(v)]
        if not finite:
            self._empty()
            return
        xs, ys, cs = thin([steps[i] for i in finite], [norm[i] for i in finite], [cos_init[i] for i in finite])
        norm_c, cos_c = self._colours()
        self._start()
        plt = self.plt
        plt.plot(xs, ys, color=norm_c, marker="braille")
        cos_points = [(x, c) for x, c in zip(xs, cs) if math.isfinite(c)]
        if cos_points:
            plt.plot([x for x, _ in cos_points], [c for _, c in cos_points], color=cos_c, marker="braille",
                     yside="right")
        if vocab_norm:
            plt.hline(vocab_norm, (128, 128, 128))  # the vocabulary's typical word
            top = max(max(ys), vocab_norm)
            plt.ylim(0, top * 1.1)
        self.border_subtitle = vector_summary(norms or [ys[-1]], cos_inits or [cs[-1]], vocab_norm)
        self.refresh()


def vector_summary(norms: list[float], cos_inits: list[float], vocab_norm: float | None) -> str:
    """`1.3× vocab · cos 0.93 · norm 0.51`: the norm against the vocabulary's median first (what
    says "too strong"), then the cosine to the initializer; with two encoders each figure is `a/b`."""
    def figures(values: list[float], fmt: str) -> str:
        return "/".join(fmt.format(v) if math.isfinite(v) else "–" for v in values)

    parts = []
    if vocab_norm and norms and math.isfinite(norms[0]):
        parts.append(f"{norms[0] / vocab_norm:.2g}× vocab")
    return " · ".join(parts + [f"cos {figures(cos_inits, '{:.2f}')}", f"norm {figures(norms, '{:.3g}')}"])


class VramChart(_Chart):
    """VRAM in GiB over steps: allocated and reserved, with the device total as a line."""

    empty_text = "VRAM: reported on CUDA devices only"
    title = "VRAM GiB"
    series = ("allocated", "reserved")

    def set_data(self, steps: list[int], allocated: list[float], reserved: list[float],
                 total: float | None) -> None:
        if self._unchanged((len(steps), steps[-1] if steps else None, total, self.app.theme)):
            return
        if not steps:
            self._empty()
            return
        xs, alloc_y, res_y = thin(steps, [a / GIB for a in allocated], [r / GIB for r in reserved])
        self._plot_pair(xs, alloc_y, res_y)
        plt = self.plt
        if total:
            plt.hline(total / GIB, "red")  # the device's total
            plt.ylim(0, total / GIB * 1.05)
        self.border_subtitle = (f"{alloc_y[-1]:.1f} allocated · {res_y[-1]:.1f} reserved"
                                + (f" · {total / GIB:.1f} total" if total else ""))
        self.refresh()


class CurveChart(_Chart):
    """Reconstruction and editability over checkpoints (the steps experiment)."""

    empty_text = "no steps experiment yet (x runs one)"
    title = "Over checkpoints"
    series = ("reconstruction", "editability")

    def set_points(self, points: list[dict]) -> None:
        if self._unchanged((tuple((p.get("step"), p.get("reconstruction"), p.get("editability")) for p in points),
                            self.app.theme)):
            return
        if not points:
            self._empty()
            return
        self._plot_pair([p.get("step", 0) for p in points], [p.get("reconstruction", 0.0) for p in points],
                        [p.get("editability", 0.0) for p in points])
        self.refresh()


class FrontierChart(_Chart):
    """The trade-off experiment's frontier: every method's Table 1 (its mean over seeds) as a point
    in the (editability, reconstruction) plane, SD's point (S), and the Pareto front as a line
    through the points no other beats in both numbers (engine.store.frontier)."""

    empty_text = "no methods measured"
    title = "Frontier"
    series = ("front", "methods")

    def set_frontier(self, frontier: dict | None) -> None:
        points = list((frontier or {}).get("points") or [])
        key = (tuple((p["label"], p["reconstruction"], p["editability"]) for p in points), self.app.theme)
        if self._unchanged(key):
            return
        if not points:
            self._empty()
            return
        front_c, point_c = self._colours()
        self._start()
        plt = self.plt
        line = front_line(points)
        if len(line) > 1:
            plt.plot([p["editability"] for p in line], [p["reconstruction"] for p in line], color=front_c,
                     marker="braille")
        alignment = label_alignment(points)
        for p in points:
            colour = front_c if p.get("front") else point_c
            plt.scatter([p["editability"]], [p["reconstruction"]], color=colour, marker="S" if p.get("sd") else "●")
            if not p.get("sd"):  # the label beside the point
                plt.text(p["label"], p["editability"], p["reconstruction"], color=colour,
                         alignment=alignment[p["label"]])
        plt.xlabel("editability")
        plt.ylabel("reconstruction")
        front = [p["label"] for p in line if not p.get("sd")]
        self.border_subtitle = f"front: {', '.join(front)}" if front else "SD alone is on the front"
        self.refresh()
