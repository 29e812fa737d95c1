"""Tables stay readable in CI logs: off a terminal, the CLI's rich output does not wrap at 80 columns (issue 14)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.table import Table

from netsim.console import PIPE_WIDTH, make_console

WIDE = ("probe " * 10, "path", "a result that goes on for a while " * 2)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _table() -> Table:
    table = Table("probe", "path", "result")
    table.add_row(*WIDE)
    return table


def test_a_console_off_a_terminal_prints_a_wide_table_row_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    console = make_console(file=out)
    assert console.width == PIPE_WIDTH
    console.print(_table())
    rows = [line for line in out.getvalue().splitlines() if line.startswith(("│", "┃"))]
    assert len(rows) == 2, out.getvalue()  # the header and the one row: no continuation lines
    assert all(cell.strip() in rows[1] for cell in WIDE), out.getvalue()
    assert len(rows[1]) > 80


def test_columns_and_an_explicit_width_win_and_a_terminal_keeps_its_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "132")
    assert make_console(file=io.StringIO()).width == 132
    assert make_console(file=io.StringIO(), width=90).width == 90
    monkeypatch.delenv("COLUMNS")
    assert make_console(file=_Tty()).width != PIPE_WIDTH  # a terminal: rich measures it (80 when it cannot)


def _run(*argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES"}}
    proc = subprocess.run(
        [sys.executable, "-m", "netsim", *argv], capture_output=True, text=True, env=env, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_memory_demo_tables_do_not_wrap_in_a_pipe() -> None:
    out = _run("demo", "--memory")
    rows = [line for line in out.splitlines() if line.startswith("│ ping v6")]
    assert rows and all("reply from 2001:db8:113::10, 60 bytes" in row for row in rows), out
    assert max(len(line) for line in out.splitlines()) > 80  # the table is wider than rich's default


def test_lab_status_does_not_wrap_in_a_pipe() -> None:
    """`netsim lab status` only reads run files; its services line is longer than 80 columns."""
    out = _run("lab", "status")
    line = next(line for line in out.splitlines() if line.startswith("services:"))
    assert line.endswith("lan printer HTTP :80 / UDP echo :7"), out
