"""Themes as data: `themes/*.toml` (shipped) and `<config dir>/themes/*.toml` (the user's).

A theme file holds the fields of `textual.theme.Theme`:

    name = "tistudio-dark"
    dark = true
    primary = "#4FB3BF"          # required; the others are optional
    secondary = "#7E8CE0"
    accent = "#F2A65A"
    background = "#14181F"
    ...
    [variables]                  # optional CSS variables, e.g. footer-key-foreground
    chart-raw = "#7E8CE0"        # the studio's own: line colours of the charts
    chart-smooth = "#F2A65A"

A broken file is skipped with a reason (shown as a notification); it never
stops the studio from opening.  Later directories win on equal names.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from textual.color import Color, ColorParseError
from textual.theme import Theme

from engine.store.paths import config_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

THEMES_ENV = "TISTUDIO_THEMES_DIR"
_COLOUR_FIELDS = ("primary", "secondary", "warning", "error", "success", "accent", "foreground",
                  "background", "surface", "panel", "boost")
_FLOAT_FIELDS = ("luminosity_spread", "text_alpha")


def shipped_dir() -> Path:
    """The repository's themes/ (beside the tistudio package), or a copy inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "themes", here / "themes"):
        if candidate.is_dir():
            return candidate
    return here.parent / "themes"


def theme_dirs() -> list[Path]:
    dirs = [shipped_dir(), config_dir() / "themes"]
    if os.environ.get(THEMES_ENV):
        dirs.append(Path(os.environ[THEMES_ENV]).expanduser())
    return dirs


def theme_from_data(data: dict, source: str = "theme") -> Theme:
    """A Theme from parsed TOML; ValueError (with the reason) if it is not usable."""
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{source}: no name")
    if "primary" not in data:
        raise ValueError(f"{source}: no primary colour")
    kwargs: dict = {"name": name.strip()}
    for key in _COLOUR_FIELDS:
        if key in data:
            value = data[key]
            try:
                Color.parse(value)
            except (ColorParseError, TypeError, ValueError):
                raise ValueError(f"{source}: {key} = {value!r} is not a colour") from None
            kwargs[key] = value
    if "dark" in data:
        if not isinstance(data["dark"], bool):
            raise ValueError(f"{source}: dark must be true or false")
        kwargs["dark"] = data["dark"]
    for key in _FLOAT_FIELDS:
        if key in data:
            if not isinstance(data[key], (int, float)):
                raise ValueError(f"{source}: {key} must be a number")
            kwargs[key] = float(data[key])
    variables = data.get("variables", {})
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise ValueError(f"{source}: [variables] must map names to strings")
    kwargs["variables"] = dict(variables)
    return Theme(**kwargs)


def load_themes(dirs: list[Path] | None = None) -> tuple[list[Theme], list[str]]:
    """Every theme found (sorted by file name within each directory) and the problems met."""
    found: dict[str, Theme] = {}
    problems: list[str] = []
    for directory in dirs if dirs is not None else theme_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
                theme = theme_from_data(data, str(path))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                problems.append(f"theme {path} skipped: {' '.join(str(exc).split())}")
                continue
            except ValueError as exc:
                problems.append(f"theme skipped: {exc}")
                continue
            found[theme.name] = theme
    return list(found.values()), problems


def chart_colours(theme: Theme | None) -> tuple[str, str]:
    """(raw, smoothed) line colours for the charts of `theme`."""
    raw, smooth = "#7E8CE0", "#F2A65A"
    if theme is not None:
        raw = theme.variables.get("chart-raw") or theme.secondary or theme.primary or raw
        smooth = theme.variables.get("chart-smooth") or theme.accent or smooth
    return raw, smooth
