"""`tistudio` with no command (and `tistudio studio`): the Textual app."""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("studio", help="open the studio (the default with no command)")
    p.set_defaults(func=open_studio)


def open_studio(args) -> int:
    try:
        from tistudio.app import run_app
    except ImportError:  # the studio lands with its own issue; until then, the commands
        from tistudio.cli import build_parser

        build_parser().print_help()
        return 0
    return run_app()
