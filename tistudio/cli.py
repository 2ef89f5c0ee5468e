"""`tistudio`: with no command, the studio; with one, a headless tool for scripts.

Exit codes: 0 success, 2 bad input (one line on stderr: the problem and the
fix), 1 internal failure, 130 interrupted.  Heavy imports (torch) happen
inside the commands that need them, so `tistudio --help` and the studio start fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from tistudio.commands import engine_cmds, job_cmds, library_cmds, run_cmds, studio_cmds


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like our other user errors."""

    def error(self, message: str):
        self.exit(2, f"tistudio: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tistudio", description="A terminal studio for Textual Inversion on Stable Diffusion.")
    parser.add_argument("--home", help="data directory (default: $TISTUDIO_HOME or the XDG data dir)")
    parser.add_argument("--model", help="model spec: builtin:tiny, a diffusers folder, a .safetensors/.ckpt, a hub id "
                        "(default: $TISTUDIO_MODEL or builtin:tiny)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    for module in (library_cmds, run_cmds, job_cmds, engine_cmds, studio_cmds):
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.home:
        os.environ["TISTUDIO_HOME"] = os.path.abspath(os.path.expanduser(args.home))
    if args.model:
        os.environ["TISTUDIO_MODEL"] = args.model
    if args.version:
        print(_version())
        return 0
    handler = getattr(args, "func", None) or studio_cmds.open_studio
    return _run(handler, args)


def _run(handler, args) -> int:
    from engine.errors import EngineError, UserError
    from engine.text import one_line

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
    except Exception as exc:  # an internal failure: one line, plus where to look
        if os.environ.get("TISTUDIO_DEBUG"):
            raise
        print(f"tistudio: internal error: {type(exc).__name__}: {one_line(exc, 500)} "
              "(set TISTUDIO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _version() -> str:
    from importlib import metadata

    try:
        return f"tistudio {metadata.version('tistudio')}"
    except metadata.PackageNotFoundError:
        return "tistudio (not installed)"


if __name__ == "__main__":
    sys.exit(main())
