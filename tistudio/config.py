"""The studio's settings: `config.toml` in the XDG config dir (`engine.paths.config_dir()`).

    theme = "tistudio-dark"        # a theme name (themes/*.toml or Textual's own)
    image_protocol = "auto"        # auto | kitty | sixel | halfblock

`TISTUDIO_IMAGE_PROTOCOL` overrides `image_protocol` for one session.  A missing
or broken file gives the defaults (the studio must open anyway); saving rewrites
the file atomically and keeps keys it does not know.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
import tomllib

from engine.paths import atomic_write_text, config_dir

PROTOCOLS = ("auto", "kitty", "sixel", "halfblock")
PROTOCOL_ENV = "TISTUDIO_IMAGE_PROTOCOL"
DEFAULT_THEME = "tistudio-dark"
_ALIASES = {"tgp": "kitty", "half": "halfblock", "halfcell": "halfblock", "half-block": "halfblock",
            "unicode": "halfblock", "none": "halfblock"}


def config_path() -> Path:
    return config_dir() / "config.toml"


def normalise_protocol(value: object) -> str | None:
    """The protocol name for `value`, or None if it is not one we know."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    text = _ALIASES.get(text, text)
    return text if text in PROTOCOLS else None


@dataclass
class Config:
    theme: str = DEFAULT_THEME
    image_protocol: str = "auto"
    extra: dict = field(default_factory=dict)  # keys we do not know, kept on save
    path: Path | None = None
    problem: str | None = None  # why the file could not be read, for a notification

    @classmethod
    def load(cls, path: Path | None = None) -> "Config":
        path = path or config_path()
        config = cls(path=path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return config
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            config.problem = f"{path} is unreadable ({' '.join(str(exc).split())}); using the defaults"
            return config
        if isinstance(data.get("theme"), str) and data["theme"].strip():
            config.theme = data["theme"].strip()
        if "image_protocol" in data:
            protocol = normalise_protocol(data["image_protocol"])
            if protocol is None:
                config.problem = (f"{path}: image_protocol {data['image_protocol']!r} is not one of "
                                  f"{', '.join(PROTOCOLS)}; using auto")
            else:
                config.image_protocol = protocol
        config.extra = {k: v for k, v in data.items() if k not in ("theme", "image_protocol")}
        return config

    def effective_protocol(self, environ: dict | None = None) -> str:
        """TISTUDIO_IMAGE_PROTOCOL if set (and valid), else the file's choice."""
        environ = os.environ if environ is None else environ
        from_env = normalise_protocol(environ.get(PROTOCOL_ENV, ""))
        return from_env or self.image_protocol

    def save(self) -> None:
        path = self.path or config_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**self.extra, "theme": self.theme, "image_protocol": self.image_protocol}
        atomic_write_text(path, tomli_w.dumps(data))
