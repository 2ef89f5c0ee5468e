"""`tistudio`: with no command, the studio; with one, a headless tool for scripts.

Exit codes: 0 success, 2 bad input (one line on stderr: the problem and the
fix), 1 internal failure, 130 interrupted.  Heavy imports (torch) happen
inside the commands that need them, so `tistudio --help` and the studio start fast.

Where a setting comes from, first match wins: the command line (global options may
come before or after the command), the environment (TISTUDIO_HOME, TISTUDIO_MODEL),
the config file (`tistudio config path` shows it), the built-in default.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.settings.model import PREDICTION_TYPES
from tistudio.commands import (
    config_cmds,
    engine_cmds,
    job_cmds,
    library_cmds,
    run_cmds,
    studio_cmds,
    train_cmds,
)
from tistudio.commands.args import positive_int

COMMAND_MODULES = (library_cmds, train_cmds, run_cmds, job_cmds, engine_cmds, config_cmds, studio_cmds)


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default in its help, except where there is nothing to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == argparse.SUPPRESS
        if "%(default)" in text or not action.option_strings or nothing or isinstance(action, argparse._HelpAction):
            return text
        if isinstance(default, (list, tuple)):
            shown = ",".join(map(str, default)).replace("%", "%%")
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like our other user errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"tistudio: error: {message} (see `{self.prog} --help`)\n")


def _add_global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    # Below the top level they default to SUPPRESS, so a value given before the command survives.
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--home", default=default, metavar="DIR",
                        help="data directory (else $TISTUDIO_HOME, the config file's home, the XDG data dir)")
    parser.add_argument("--model", default=default, metavar="SPEC",
                        help="model spec: builtin:demo, builtin:tiny, a diffusers folder, a .safetensors/.ckpt, "
                             "a hub id (else $TISTUDIO_MODEL, the config file's model, builtin:demo)")
    # They qualify --model where its weights cannot say (an SD 2.x single file: 768 px v-prediction,
    # or 512 px epsilon); engine.settings.model.  Not --resolution: train/generate have their own.
    parser.add_argument("--prediction-type", default=default, choices=PREDICTION_TYPES,
                        help="what the model predicts, for an SD 2.x single file: epsilon (2.x-base, 512 px) or "
                             "v_prediction (768 px) (else $TISTUDIO_PREDICTION_TYPE, the config file's "
                             "prediction_type, the file's own sign or the guess v_prediction)")
    parser.add_argument("--model-resolution", default=default, type=positive_int, metavar="PX",
                        help="the model's own resolution in pixels, e.g. 512 for a 2.x-base file (else "
                             "$TISTUDIO_MODEL_RESOLUTION, the config file's model_resolution, the model's config)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tistudio", description="A terminal studio for Textual Inversion on Stable Diffusion. "
                    "With no command it opens the studio.")
    _add_global_options(parser, top=True)
    parser.add_argument("--version", action="store_true",
                        help="print the versions of tistudio, torch, CUDA, diffusers and the device, and exit")
    sub = parser.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    for leaf in _leaf_parsers(parser):
        if leaf is not parser:
            _add_global_options(leaf, top=False)
    from tistudio.config import apply_command_defaults

    apply_command_defaults(parser)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every parser that can end a command line (the top one and each subcommand's)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                yield from _leaf_parsers(child)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except _config_errors() as exc:
        print(f"tistudio: error: {exc}", file=sys.stderr)
        return 2
    _autocomplete(parser)
    args = parser.parse_args(argv)
    try:
        _settle_globals(args)
    except _config_errors() as exc:  # a bad model_resolution in the config file, say
        print(f"tistudio: error: {exc}", file=sys.stderr)
        return 2
    if args.version:
        from tistudio.commands.about import version_report

        print(version_report())
        return 0
    handler = getattr(args, "func", None) or studio_cmds.open_studio
    return _run(handler, args)


def _config_errors():
    from engine.errors import UserError

    return (UserError,)


def _autocomplete(parser: argparse.ArgumentParser) -> None:
    # A no-op unless the shell's completion hook called us (argcomplete checks its env vars).
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete

        argcomplete.autocomplete(parser)


def _settle_globals(args) -> None:
    """--home/--model (and the config file's [cluster] ray_address) reach every command, and the
    engine a command starts, through the environment."""
    from tistudio.config import load_config

    config = load_config()
    home = args.home or os.environ.get("TISTUDIO_HOME") or config.home
    if home:
        os.environ["TISTUDIO_HOME"] = os.path.abspath(os.path.expanduser(home))
    model = args.model or os.environ.get("TISTUDIO_MODEL") or config.model
    if model:
        os.environ["TISTUDIO_MODEL"] = model
    _settle_model_options(args, config)
    if config.ray_address and "TISTUDIO_RAY_ADDRESS" not in os.environ:
        os.environ["TISTUDIO_RAY_ADDRESS"] = config.ray_address  # an engine started from here runs on Ray


def _settle_model_options(args, config) -> None:
    """--prediction-type/--model-resolution, else the environment's, else the config file's
    prediction_type/model_resolution, into the environment beside $TISTUDIO_MODEL.  The config
    file's qualify the config file's model: another --model or $TISTUDIO_MODEL leaves them out."""
    from engine.settings.model import PREDICTION_ENV, RESOLUTION_ENV, ModelOptions, prediction_type, resolution

    for env, value in ((PREDICTION_ENV, args.prediction_type), (RESOLUTION_ENV, args.model_resolution)):
        if value is not None:
            os.environ[env] = str(value)
    from_file = ModelOptions(prediction_type(config.prediction_type, f"{config.path}: prediction_type"),
                             resolution(config.model_resolution, f"{config.path}: model_resolution"))
    if config.model and os.environ.get("TISTUDIO_MODEL") == config.model:
        for env, value in from_file.env().items():
            if not os.environ.get(env):
                os.environ[env] = value
    ModelOptions.from_env()  # $TISTUDIO_PREDICTION_TYPE/$TISTUDIO_MODEL_RESOLUTION set by hand: checked now


def _run(handler, args) -> int:
    from engine.errors import EngineError, UserError, one_line

    try:
        return handler(args) or 0
    except UserError as exc:
        print(f"tistudio: error: {one_line(exc, 500)}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"tistudio: engine error: {one_line(exc, 500)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tistudio: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        from engine.errors import disk_full_message

        message = disk_full_message(exc)
        if message is None:
            return _internal(exc)
        print(f"tistudio: error: {message}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - an internal failure: one line, plus where to look
        return _internal(exc)


def _internal(exc: BaseException) -> int:
    """An internal failure: one line, plus where to look."""
    from engine.errors import one_line

    if os.environ.get("TISTUDIO_DEBUG"):
        raise exc
    print(f"tistudio: internal error: {type(exc).__name__}: {one_line(exc, 500)} "
          "(set TISTUDIO_DEBUG=1 for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
