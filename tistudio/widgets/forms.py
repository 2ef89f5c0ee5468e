"""Small form pieces: a labelled one-line row, suggesters for tokens and paths, number parsing."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Iterable

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.suggester import Suggester
from textual.widget import Widget
from textual.widgets import Label


class FieldRow(Horizontal):
    """`label  [widget]` on one line (compact widgets), so forms fit an 80×24 terminal."""

    DEFAULT_CSS = """
    FieldRow { height: auto; width: 100%; margin: 0 0 0 0; }
    FieldRow > .field-label { width: 14; height: 1; color: $text-muted; padding: 0 1 0 0; text-wrap: nowrap;
                              text-overflow: ellipsis; }
    FieldRow > Input, FieldRow > Select, FieldRow > RadioSet, FieldRow > Checkbox { width: 1fr; }
    """

    def __init__(self, label: str, widget: Widget, *, label_width: int | None = None, id: str | None = None,
                 classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self._label = label
        self._widget = widget
        self._label_width = label_width

    def compose(self) -> ComposeResult:
        label = Label(self._label, classes="field-label")
        if self._label_width:
            label.styles.width = self._label_width
        yield label
        yield self._widget


class TokenSuggester(Suggester):
    """Completes a concept token (`<sam` → `<sample>`) at the end of a prompt."""

    def __init__(self, tokens: Callable[[], Iterable[str]]):
        super().__init__(use_cache=False, case_sensitive=True)
        self._tokens = tokens

    async def get_suggestion(self, value: str) -> str | None:
        return complete_token(value, self._tokens())


def complete_token(value: str, tokens: Iterable[str]) -> str | None:
    if not value or value[-1].isspace():
        return None
    word = value.split()[-1]
    # the word may be glued to punctuation: "(<sam"
    start = word.rfind("<")
    fragment = word[start:] if start >= 0 else word
    if len(fragment) < 2 and not fragment.startswith("<"):
        return None
    for token in sorted(tokens, key=str.casefold):
        if token.casefold().startswith(fragment.casefold()) and token != fragment:
            return value + token[len(fragment):]
    return None


class PathSuggester(Suggester):
    """Completes a file system path; folders get a trailing slash.  `dirs_only` for image folders."""

    def __init__(self, dirs_only: bool = False, suffixes: tuple[str, ...] = ()):
        super().__init__(use_cache=False, case_sensitive=True)
        self.dirs_only = dirs_only
        self.suffixes = suffixes

    async def get_suggestion(self, value: str) -> str | None:
        return complete_path(value, self.dirs_only, self.suffixes)


def complete_path(value: str, dirs_only: bool = False, suffixes: tuple[str, ...] = ()) -> str | None:
    if not value:
        return None
    expanded = os.path.expanduser(value)
    folder, stem = os.path.split(expanded)
    try:
        entries = sorted(os.scandir(folder or "."), key=lambda e: e.name)
    except OSError:
        return None
    for entry in entries:
        if not entry.name.startswith(stem) or entry.name == stem or (entry.name.startswith(".") and not
                                                                       stem.startswith(".")):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            continue
        if dirs_only and not is_dir:
            continue
        if suffixes and not is_dir and not entry.name.lower().endswith(suffixes):
            continue
        return value + entry.name[len(stem):] + ("/" if is_dir else "")
    return None


class PinSuggester(Suggester):
    """Completes a saved embedding's NAME@RUN[:STEP] at the end of a comma-separated list; with
    `paths`, a file path when no embedding matches (fields that take either)."""

    def __init__(self, pins: Callable[[], Iterable[str]], paths: bool = False):
        super().__init__(use_cache=False, case_sensitive=True)
        self._pins = pins
        self.paths = paths

    async def get_suggestion(self, value: str) -> str | None:
        return complete_pin(value, self._pins()) or (complete_path(value) if self.paths else None)


def complete_pin(value: str, pins: Iterable[str]) -> str | None:
    fragment = value.rpartition(",")[2].lstrip()
    if not fragment:
        return None
    for pin in sorted(pins):
        if pin.startswith(fragment) and pin != fragment:
            return value + pin[len(fragment):]
    return None


def split_list(text: str) -> list[str]:
    """`a, b,,c ` → ["a", "b", "c"]."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_int(text: str, name: str, minimum: int | None = None) -> int:
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {text.strip()!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}")
    return value


def parse_optional_int(text: str, name: str, minimum: int | None = None) -> int | None:
    """An empty field is None (the engine's default); anything else as `parse_int`."""
    return parse_int(text, name, minimum) if text.strip() else None


def parse_float(text: str, name: str, positive: bool = False, minimum: float | None = None) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{name} must be a number, not {text.strip()!r}") from None
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a positive number")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}")
    return value


def shorten_path(path: str | Path, home: Path | None = None) -> str:
    """`path` relative to the data home (or with ~ for the user's home) when it is inside it."""
    p = Path(path)
    if home is not None:
        try:
            return str(p.relative_to(home))
        except ValueError:
            pass
    try:
        return "~/" + str(p.relative_to(Path.home()))
    except ValueError:
        return str(p)


class FieldError(ValueError):
    """A form value the engine would refuse: its message, and the id of the field it is about (or None)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def field_for(message: str, form: Widget, aliases: dict[str, str] | None = None) -> str | None:
    """The field an engine message is about: the first command-line option it names (the CLI's
    spelling, e.g. --batch-size), as the form's field id (batch_size, or as `aliases` maps it;
    --flip has no field in the New-run form)."""
    import re

    for option in re.findall(r"(?<![\w-])-{1,2}([a-z][a-z-]*)", message):
        name = (aliases or {}).get(option, option.replace("-", "_"))
        if form.query(f"#{name}"):
            return name
    return None
