"""Settings: `config.toml` in the XDG config dir (`engine.store.paths.config_dir()`).

    theme = "tistudio-dark"        # a theme name (themes/*.toml or Textual's own)
    image_protocol = "auto"        # auto | kitty | sixel | halfblock
    model = "builtin:demo"         # the default model spec (--model and $TISTUDIO_MODEL win)
    prediction_type = "epsilon"    # what that model predicts, where its weights cannot say (an SD 2.x
    model_resolution = 512         # single file); they qualify this model only (engine.settings.model)
    home = "~/tistudio-data"       # the data directory (--home and $TISTUDIO_HOME win)

    [train]                        # defaults for `tistudio train` and the studio's New-run form
    steps = 1500
    low_vram = true
    [generate]                     # defaults for `tistudio generate`; [eval] likewise
    sampler = "euler-a"
    [cluster]                      # where the engine runs jobs ($TISTUDIO_RAY_ADDRESS and
    ray_address = "auto"           # `engine start --ray` win): a Ray cluster, "auto" or host:port

Keys in a command's table are its options, spelt with - or _ (`tistudio train --help`).

`TISTUDIO_IMAGE_PROTOCOL` overrides `image_protocol` for one session.  A missing
or broken file gives the defaults (the studio must open anyway); saving rewrites
the file atomically and keeps keys it does not know.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from engine.store.paths import atomic_write_text, config_dir

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
    model: str | None = None
    prediction_type: str | None = None  # qualify `model`, as written (checked where used: tistudio.cli)
    model_resolution: int | str | None = None
    home: str | None = None
    commands: dict = field(default_factory=dict)  # {"train": {...}, "generate": {...}}: option defaults
    ray_address: str | None = None  # [cluster] ray_address: run the engine's jobs on this Ray cluster
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
        for key in ("model", "home"):
            if isinstance(data.get(key), str) and data[key].strip():
                setattr(config, key, data[key].strip())
        for key in ("prediction_type", "model_resolution"):  # kept as written: the CLI checks them
            value = data.get(key)
            setattr(config, key, value.strip() if isinstance(value, str) else value)
        config.commands = {k: v for k, v in data.items() if k in COMMAND_TABLES and isinstance(v, dict)}
        cluster = data.get("cluster")
        if isinstance(cluster, dict) and "ray_address" in cluster:
            address = cluster["ray_address"]
            if isinstance(address, str) and address.strip():
                config.ray_address = address.strip()
            else:
                config.problem = f"{path}: [cluster] ray_address must be \"auto\" or a host:port; ignored"
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


COMMAND_TABLES = ("train", "generate", "eval")


def load_config() -> Config:
    return Config.load()


def apply_command_defaults(parser, config: Config | None = None) -> None:
    """Make the config file's [train]/[generate]/[eval] tables the defaults of those commands.

    A key that is not an option of the command, or a value of the wrong kind, is a
    UserError naming the file, the key and what would be right."""
    from engine.errors import UserError

    config = config or load_config()
    for command, table in config.commands.items():
        sub = _subcommand(parser, command)
        if sub is None:
            continue
        actions = {a.dest: a for a in sub._actions if a.option_strings}
        defaults = {}
        for key, value in table.items():
            dest = key.replace("-", "_")
            action = actions.get(dest)
            if action is None or dest in ("home", "model", "help"):
                known = ", ".join(sorted(d for d in actions if d not in ("home", "model", "help")))
                raise UserError(f"{config.path}: [{command}] has no setting {key!r}; known: {known}")
            defaults[dest] = _config_value(config.path, command, key, value, action)
        sub.set_defaults(**defaults)


def _subcommand(parser, name: str):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _config_value(path, command: str, key: str, value, action):
    """Convert a TOML value the way the command line would, with the option's own checks."""
    import argparse

    from engine.errors import UserError

    where = f"{path}: [{command}] {key}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false")
        return value
    try:
        if isinstance(value, list) and action.type is not None:
            value = action.type(",".join(map(str, value)))
        elif action.type is not None and not isinstance(value, bool):
            value = action.type(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise UserError(f"{where} = {value!r} is not valid ({exc})") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where} must be one of {', '.join(map(str, action.choices))}")
    return value
