"""`tistudio` with no command (and `tistudio studio`): the Textual app."""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("studio", help="open the studio (the default with no command)")
    p.set_defaults(func=open_studio)


def open_studio(args) -> int:
    # --home and --model reach the studio through TISTUDIO_HOME / TISTUDIO_MODEL (set by cli.main).
    from tistudio.app import run_app

    return run_app()
