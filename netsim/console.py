"""The rich console the CLI prints with: terminal width on a terminal, no wrapping in a pipe or a CI log.

rich sizes a console that is not a terminal at 80 columns, so a table wider than that (the demo's probe rows,
``netsim lab status``'s processes and addresses) wraps its cells onto continuation lines, which a CI log or a
``grep`` then shows as broken rows. Off a terminal `make_console` sizes the console by ``COLUMNS`` when the user
set it, else wide enough that nothing wraps: each table takes its natural width, each line is one line.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from rich.console import Console

__all__ = ["PIPE_WIDTH", "make_console"]

#: Columns of a console writing to a pipe or a file (a line of the widest table fits; no rule is drawn that wide).
PIPE_WIDTH = 400


def make_console(file: IO[str] | None = None, **kwargs: Any) -> Console:
    """A `rich.console.Console` on ``file`` (stdout by default) that wraps only at a real terminal's width.

    Args:
        file: where to print (default: ``sys.stdout`` at the time of each write, as rich does).
        **kwargs: passed to `rich.console.Console` (``width=`` wins over the rule above).
    """
    stream = file if file is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    if "width" not in kwargs and not (isatty is not None and isatty()):
        columns = os.environ.get("COLUMNS", "")
        kwargs["width"] = int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH
    kwargs.setdefault("highlight", False)
    return Console(file=file, **kwargs)
