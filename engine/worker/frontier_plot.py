"""The frontier drawn: editability (x) against reconstruction (y), as the studio's trade-off charts
draw it, one point per method, SD's point, each point's standard-error bars, and the Pareto
front as a line through its points.

`frontier_text` is a plotext chart for terminals and table.md (with the table itself in
engine.store.frontier); `frontier_png` draws the same with PIL for frontier.png.  Both read
the dict `engine.store.frontier.frontier` returns.
"""

from __future__ import annotations

from pathlib import Path

from engine.store.frontier import front_line, label_alignment

SIZE = (720, 540)
MARGIN = (70, 30, 30, 60)  # left, top, right, bottom
FRONT, POINT, SD_COLOUR, AXIS = (200, 60, 40), (40, 90, 200), (40, 150, 70), (60, 60, 60)


def frontier_text(data: dict, width: int = 78, height: int = 22) -> str:
    """A plotext scatter of the frontier ('' when plotext is not installed)."""
    points = data.get("points") or []
    try:
        import plotext as plt
    except ImportError:
        return ""
    plt.clear_figure()
    line = front_line(points)
    if len(line) > 1:
        plt.plot([p["editability"] for p in line], [p["reconstruction"] for p in line],
                 marker="braille")
    alignment = label_alignment(points)
    for p in points:  # each point labelled beside it
        plt.scatter([p["editability"]], [p["reconstruction"]], marker="●" if p["front"] else "○")
        plt.text(p["label"], p["editability"], p["reconstruction"], alignment=alignment[p["label"]])
    plt.title("the trade-off: the line is the Pareto front (● on it, ○ behind it)")
    plt.xlabel("editability")
    plt.ylabel("reconstruction")
    plt.plotsize(width, height)
    chart = plt.uncolorize(plt.build())
    plt.clear_figure()
    return chart


def frontier_png(data: dict, path: Path) -> Path:
    """frontier.png: the points with their standard-error bars, labelled, and the front."""
    from PIL import Image, ImageDraw

    from engine.sd.generation import _font, save_png

    points = data.get("points") or []
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = _font(13)
    to_xy, ticks = _scale(points)
    left, top, right, bottom = MARGIN
    draw.rectangle([left, top, SIZE[0] - right, SIZE[1] - bottom], outline=AXIS)
    for axis, values in ticks.items():
        for v in values:
            x, y = to_xy(v if axis == "x" else None, v if axis == "y" else None)
            if axis == "x":
                draw.line([x, SIZE[1] - bottom, x, SIZE[1] - bottom + 4], fill=AXIS)
                draw.text((x - 18, SIZE[1] - bottom + 6), f"{v:.3f}", fill=AXIS, font=font)
            else:
                draw.line([left - 4, y, left, y], fill=AXIS)
                draw.text((left - 46, y - 7), f"{v:.3f}", fill=AXIS, font=font)
    draw.text((SIZE[0] // 2 - 40, SIZE[1] - 22), "editability", fill=AXIS, font=font)
    draw.text((6, top - 22), "reconstruction", fill=AXIS, font=font)
    line = [to_xy(p["editability"], p["reconstruction"]) for p in front_line(points)]
    if len(line) > 1:
        draw.line(line, fill=FRONT, width=2)
    for p in points:
        _draw_point(draw, font, p, to_xy)
    return save_png(path, image)


def _draw_point(draw, font, p: dict, to_xy) -> None:
    x, y = to_xy(p["editability"], p["reconstruction"])
    colour = SD_COLOUR if p.get("sd") else (FRONT if p["front"] else POINT)
    for key, se_key in (("editability", "se_editability"), ("reconstruction", "se_reconstruction")):
        se = p.get(se_key)
        if se:
            if key == "editability":
                (x0, _), (x1, _) = to_xy(p[key] - se, None), to_xy(p[key] + se, None)
                draw.line([x0, y, x1, y], fill=colour)
            else:
                (_, y0), (_, y1) = to_xy(None, p[key] - se), to_xy(None, p[key] + se)
                draw.line([x, y0, x, y1], fill=colour)
    r = 5
    draw.ellipse([x - r, y - r, x + r, y + r], fill=colour if p["front"] else "white", outline=colour, width=2)
    draw.text((x + 8, y - 16), p["label"], fill=colour, font=font)


def _scale(points: list[dict]):
    """Data -> pixel mapping over the points' range (with their error bars), padded; and ticks."""
    def span(key: str, se_key: str) -> tuple[float, float]:
        lows = [p[key] - (p.get(se_key) or 0) for p in points] or [0.0]
        highs = [p[key] + (p.get(se_key) or 0) for p in points] or [1.0]
        lo, hi = min(lows), max(highs)
        pad = max(0.005, (hi - lo) * 0.12)
        return lo - pad, hi + pad

    (x_lo, x_hi), (y_lo, y_hi) = span("editability", "se_editability"), span("reconstruction", "se_reconstruction")
    left, top, right, bottom = MARGIN
    w, h = SIZE[0] - left - right, SIZE[1] - top - bottom

    def to_xy(x: float | None, y: float | None) -> tuple[float, float]:
        px = left + (x - x_lo) / (x_hi - x_lo) * w if x is not None else 0.0
        py = top + (1 - (y - y_lo) / (y_hi - y_lo)) * h if y is not None else 0.0
        return px, py

    ticks = {"x": [x_lo + (x_hi - x_lo) * i / 4 for i in range(5)],
             "y": [y_lo + (y_hi - y_lo) * i / 4 for i in range(5)]}
    return to_xy, ticks
