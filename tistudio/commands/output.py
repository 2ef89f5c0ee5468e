"""Printing for the commands: JSON for scripts, rich tables for people."""

from __future__ import annotations

import json
import sys


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    """A table for people.  Its first column (a run id, a name: what people copy into the next
    command) is never cut or wrapped, however narrow the terminal; the others give way."""
    from rich.console import Console
    from rich.table import Table

    cells = [["" if v is None else str(v) for v in row] for row in rows]
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        whole = max([len(col), *(len(row[0]) for row in cells)]) if i == 0 else None
        table.add_column(col, no_wrap=i == 0, min_width=whole)
    for row in cells:
        table.add_row(*row)
    # Off a terminal (a pipe, a log) nothing wraps the lines: give the table the room it needs.
    Console(width=None if sys.stdout.isatty() else 240).print(table)


def home():
    from engine.store.paths import home_dir

    return home_dir()
